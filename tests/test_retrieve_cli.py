"""`elm-jax retrieve` on a small library built with the hashing embedder."""

import json

import pytest

import library_fixtures
from elm_jax.library import cli as library_cli
from elm_jax.library.instances import Instance
from elm_jax.retrieval import cli

TOPICS = {
    "cooking": "Stir the {} sauce slowly and season the pasta with salt and pepper",
    "astronomy": "The telescope observed the {} nebula beyond the orbit of distant planets",
    "football": "The striker kicked the {} ball past the goalkeeper in the final minute",
}
COLORS = ["red", "green", "blue", "white", "black", "purple", "orange", "yellow", "pink",
          "brown", "silver", "golden"]


def _topic(topic: str, colors) -> list[Instance]:
  return [Instance(TOPICS[topic].format(c), ("yes", "no")) for c in colors]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("retrieve")
  root = tmp / "lib"
  assert library_cli.main(["create", str(root), "--embedder", "hashing", "--samples", "6",
                           "--dim", "97"]) == 0
  for topic in TOPICS:
    expert = library_fixtures.write_expert(tmp / "experts" / topic, topic, topic)
    data = library_fixtures.write_jsonl(tmp / f"{topic}.jsonl", _topic(topic, COLORS[:6]))
    assert library_cli.main(["add", str(root), str(expert), "--instances", str(data)]) == 0
  targets = {}
  for topic in TOPICS:
    targets[topic] = library_fixtures.write_jsonl(tmp / f"target_{topic}.jsonl",
                                                  _topic(topic, COLORS[6:]))
  return root, targets


def test_retrieve_chooses_matching_expert(library, tmp_path, capsys):
  root, targets = library
  output = tmp_path / "choice.json"
  assert cli.main(["--library", str(root), "--instances", str(targets["astronomy"]),
                   "--num-queries", "4", "--output", str(output)]) == 0
  printed = capsys.readouterr().out
  assert "expert astronomy" in printed
  record = json.loads(output.read_text())
  decision = record["decisions"][0]
  assert decision["expert"] == "astronomy"
  assert decision["votes"] == {"astronomy": 4.0}
  assert decision["margin"] == 1.0
  assert len(decision["nearest"]) == 3
  neighbor = decision["nearest"][0]["neighbors"][0]
  assert "telescope" in neighbor["text"]
  assert "telescope" in decision["nearest"][0]["query"]


def test_retrieve_sharded_same_decision(library, tmp_path):
  root, targets = library
  records = []
  for extra in ([], ["--shard"]):
    output = tmp_path / f"choice{len(extra)}.json"
    assert cli.main(["--library", str(root), "--instances", str(targets["cooking"]),
                     "--router", "topk_weighted", "--k", "4", "--output", str(output)]
                    + extra) == 0
    records.append(json.loads(output.read_text())["decisions"][0])
  assert records[0]["expert"] == "cooking"
  assert records[0] == records[1]


def test_retrieve_top_k_router(library, tmp_path):
  root, targets = library
  output = tmp_path / "choice.json"
  assert cli.main(["--library", str(root), "--instances", str(targets["football"]),
                   "--router", "topk_weighted", "--k", "3", "--output", str(output)]) == 0
  decision = json.loads(output.read_text())["decisions"][0]
  assert decision["expert"] == "football"
  assert decision["method"] == "top3_vote_weighted"


def test_retrieve_heatmap(library, tmp_path):
  root, targets = library
  heatmap = tmp_path / "heat.png"
  output = tmp_path / "all.json"
  args = ["--library", str(root), "--heatmap", str(heatmap), "--output", str(output),
          "--heatmap-metric", "mean_top1_similarity"]
  for topic in TOPICS:
    args += ["--instances", str(targets[topic])]
  assert cli.main(args) == 0
  assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  decisions = json.loads(output.read_text())["decisions"]
  assert [d["expert"] for d in decisions] == list(TOPICS)


def test_retrieve_rejects_missing_library(tmp_path, capsys):
  target = library_fixtures.write_jsonl(tmp_path / "t.jsonl", _topic("cooking", ["red"]))
  assert cli.main(["--library", str(tmp_path / "nope"), "--instances", str(target)]) == 1
  assert "not an Expert Library" in capsys.readouterr().err
