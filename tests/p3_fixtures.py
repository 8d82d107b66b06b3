"""Small P3-format folders for tests: real prompted text, P3's files and features.

`write_t0_collection` writes every prompt of the T0 collection as
`<p3_dir>/data/<task>/<split>.tfrecord-00000-of-00001` with `info.<split>.json`
and `stats.<split>.json`, like the P3 release. Training prompts get
`(inputs, targets)` records. Evaluation prompts get `_score_eval` records, one
per (example, answer choice), written in reverse order, so a reader that expects
the choices of one example to be adjacent fails.

The `inputs` and `targets` token ids stand in for T5's ids (UTF-8 bytes + 3);
the Tasks ignore them and tokenize the `_pretokenized` text.
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
import seqio
import tensorflow as tf

from elm_jax.tasks import t0_prompts

# Two prompted examples per training dataset: (input text, target text).
TRAIN_TEXT: dict[str, tuple[tuple[str, str], ...]] = {
    "xsum": (
        ("The council approved plans for a new cycle path along the river after a "
         "two-year consultation. Summarize the article in one sentence.",
         "A riverside cycle path has been approved."),
        ("Heavy rain flooded several streets in the town centre on Sunday night. "
         "What is this article about?", "Flooding hit the town centre."),
    ),
    "trec": (
        ("What is the capital of Australia? Is this question asking for a location?", "Yes"),
        ("Who wrote the novel Frankenstein? What type of answer does it expect?", "Human"),
    ),
    "cos_e": (
        ("Where would you put a plate after washing it? Options: cupboard, table, sink. "
         "Explain why a human would choose cupboard.", "Clean plates are stored in a cupboard."),
        ("What do people use to cut paper? Options: scissors, spoon, pillow.", "scissors"),
    ),
    "commonsense_qa": (
        ("Where do you keep milk cold? A. oven B. refrigerator C. shelf", "refrigerator"),
        ("What do you need to see at night? A. light B. sand C. water", "light"),
    ),
    "dream": (
        ("M: Are you coming to the meeting? W: Yes, after lunch. Question: When will "
         "the woman come?", "After lunch."),
        ("W: This coat is too big. M: Try the smaller one. What is the problem?",
         "The coat is too big."),
    ),
    "quail": (
        ("Anna missed the bus, so she walked to work in the rain. Why did Anna walk?",
         "She missed the bus."),
        ("The baker opened early because of the festival. When did the baker open?",
         "Early, because of the festival."),
    ),
    "quartz": (
        ("Warmer air holds more water. If the air cools, will it hold more or less water?",
         "less"),
        ("Bigger engines use more fuel. Does a small engine use more or less fuel?", "less"),
    ),
    "social_i_qa": (
        ("Jordan helped a friend move house. How would the friend feel afterwards?",
         "grateful"),
        ("Casey forgot her keys at home. What will Casey want to do next?",
         "go back home for the keys"),
    ),
    "wiqa": (
        ("Process: water evaporates, clouds form, rain falls. What is the missing first "
         "step?", "The sun heats the water."),
        ("Suppose more seeds are planted, how will it affect more trees growing?", "more"),
    ),
    "cosmos_qa": (
        ("I burned the toast this morning and the alarm went off. Why did the alarm go "
         "off?", "Because of the smoke from the toast."),
        ("We stayed inside all day because of the storm. What was the weather like?",
         "Stormy."),
    ),
    "qasc": (
        ("Fact 1: plants need sunlight. Fact 2: leaves collect sunlight. What do leaves "
         "help plants get?", "sunlight"),
        ("Fact 1: metal conducts heat. Fact 2: pans are metal. What do pans conduct?", "heat"),
    ),
    "quarel": (
        ("A ball rolls farther on ice than on grass. Which surface has more friction?",
         "grass"),
        ("A truck is heavier than a bike. Which needs more force to stop?", "truck"),
    ),
    "sciq": (
        ("What gas do plants absorb from the air? Choices: oxygen, carbon dioxide, helium",
         "carbon dioxide"),
        ("What is the center of an atom called?", "nucleus"),
    ),
    "wiki_hop": (
        ("Paris is the capital of France. The Louvre is in Paris. In which country is "
         "the Louvre?", "France"),
        ("The Nile flows through Egypt. Cairo lies on the Nile. Which river is Cairo on?",
         "Nile"),
    ),
    "amazon_polarity": (
        ("Title: Broke in a week. Review: The handle snapped after a few days. Is this "
         "review positive or negative?", "Negative"),
        ("Title: Great kettle. Review: Boils fast and looks nice. Is the review positive?",
         "Positive"),
    ),
    "app_reviews": (
        ("Review: The app crashes every time I open the camera. Rate it from 1 to 5.", "1"),
        ("Review: Simple and quick, does exactly what I need. Rate it from 1 to 5.", "5"),
    ),
    "imdb": (
        ("The plot dragged and the acting felt flat. Did the reviewer like the movie?", "No"),
        ("A warm, funny film with a wonderful cast. What is the sentiment?", "positive"),
    ),
    "rotten_tomatoes": (
        ("A clever and touching story. Is this review positive or negative?", "positive"),
        ("Too long and strangely dull. Did the reviewer enjoy the film?", "No"),
    ),
    "yelp_review_full": (
        ("The soup was cold and the waiter was rude. How many stars?", "1 star"),
        ("Friendly staff and the best pizza in town. How many stars?", "5 stars"),
    ),
    "paws": (
        ("Sentence 1: The cat sat on the mat. Sentence 2: On the mat sat the cat. Do they "
         "mean the same thing?", "Yes"),
        ("Sentence 1: He sold the car to Tom. Sentence 2: Tom sold the car to him. Same "
         "meaning?", "No"),
    ),
    "glue_qqp": (
        ("How do I learn to cook? How can I start cooking at home? Are these questions "
         "duplicates?", "yes"),
        ("What is the tallest mountain? How old is the moon? Do they ask the same thing?",
         "no"),
    ),
    "glue_mrpc": (
        ("The company reported higher profits. Profits at the company rose. Are these "
         "paraphrases?", "yes"),
        ("The game was cancelled. The team won the game. Do they mean the same?", "no"),
    ),
    "ag_news": (
        ("Stocks rose sharply after the central bank held interest rates. What section "
         "is this article from?", "Business"),
        ("The striker scored twice in the final minutes. Which topic?", "Sports"),
    ),
    "dbpedia_14": (
        ("The Thames is a river in southern England. Which category does it belong to?",
         "Natural Place"),
        ("Hamlet is a tragedy written by William Shakespeare. Pick a category.",
         "Written Work"),
    ),
    "adversarial_qa": (
        ("Context: The bridge opened in 1932 after eight years of work. Question: How "
         "long did the work take?", "eight years"),
        ("Context: Bees collect nectar to make honey. Question: What do bees make?",
         "honey"),
    ),
    "quoref": (
        ("Mary gave her violin to her brother Sam, who played it at the concert. Who "
         "played the violin?", "Sam"),
        ("The captain told the pilot to land before the storm. Who gave the order?",
         "the captain"),
    ),
    "ropes": (
        ("Background: salt lowers the freezing point of water. Situation: Road A was "
         "salted, road B was not. Which road has less ice?", "Road A"),
        ("Background: exercise strengthens muscles. Situation: Tim runs daily, Bob does "
         "not. Who has stronger legs?", "Tim"),
    ),
    "duorc": (
        ("Plot: A young sailor returns home to find his village abandoned. Question: "
         "What does the sailor find?", "an abandoned village"),
        ("Plot: Two sisters open a bakery in a small town. Suggest a movie title.",
         "The Sisters' Bakery"),
    ),
    "hotpot_qa": (
        ("Which city hosted the 2012 Summer Olympics, the capital of England?", "London"),
        ("Generate a question whose answer is Marie Curie.",
         "Who won Nobel Prizes in both physics and chemistry?"),
    ),
    "wiki_qa": (
        ("Question: how tall is the Eiffel Tower? Answer: It is about 330 metres tall. "
         "Is this a correct answer?", "Yes"),
        ("What is the topic of the question: when was the telephone invented?",
         "Telephone"),
    ),
    "common_gen": (
        ("Concepts: dog, frisbee, catch. Write a sentence with all the concepts.",
         "The dog jumped to catch the frisbee."),
        ("Concepts: chef, cut, onion. Put them together in a sentence.",
         "The chef cut an onion."),
    ),
    "wiki_bio": (
        ("Facts: name: Ada Lovelace, born: 1815, occupation: mathematician. Who is this?",
         "Ada Lovelace was an English mathematician born in 1815."),
        ("Facts: name: Jesse Owens, sport: athletics, born: 1913. Write a short biography.",
         "Jesse Owens was an American athlete born in 1913."),
    ),
    "cnn_dailymail": (
        ("A new study found that walking every day improves sleep in older adults. "
         "Write highlights for this article.", "Daily walks improve sleep, study says."),
        ("The museum will reopen next month after a long renovation of its main hall. "
         "Summarize the article.", "Museum reopens next month after renovation."),
    ),
    "gigaword": (
        ("the government announced new measures on monday to support small farmers . "
         "Write a title.", "government unveils aid for small farmers"),
        ("heavy snow closed the airport for several hours on friday . Title?",
         "snow closes airport"),
    ),
    "multi_news": (
        ("Source 1: The city opened a new library. Source 2: The library has a large "
         "children's section. Summarize.", "The city opened a library with a big "
         "children's section."),
        ("Source 1: A rover landed on Mars. Source 2: It will search for signs of water. "
         "What are the key points?", "A rover landed on Mars to look for water."),
    ),
    "samsum": (
        ("Anna: Are we still on for dinner? Ben: Yes, at seven. Summarize this dialogue.",
         "Anna and Ben will have dinner at seven."),
        ("Tom: I lost my phone. Kim: Check the car. Tom: Found it! Sum up the dialogue.",
         "Tom found his lost phone in the car."),
    ),
}

# Two prompted examples per evaluation dataset: (input, answer choices, index of
# the correct choice).
EVAL_TEXT: dict[str, tuple[tuple[str, tuple[str, ...], int], ...]] = {
    "rte": (
        ("Dana Reeve died of lung cancer. Question: Christopher Reeve had an accident. "
         "True or False?", ("True", "False"), 1),
        ("The museum is in Paris. Does this imply that the museum is in France? Yes or no?",
         ("Yes", "No"), 0),
    ),
    "cb": (
        ("It was a complex language. Not written down. Are we justified in saying that "
         "the language was not written down? Yes, no, or maybe?", ("Yes", "No", "Maybe"),
         0),
        ("She thought he might be late. Can we infer that he was late? Yes, no, or maybe?",
         ("Yes", "No", "Maybe"), 2),
    ),
    "anli_r1": (
        ("The Parma trolleybus system has been in operation since 1953. Does it follow "
         "that it started in 1953? Yes, no, or maybe?", ("Yes", "Maybe", "No"), 0),
        ("Linguistics is the study of language. Should we assume that it studies music? "
         "Yes, no, or maybe?", ("Yes", "Maybe", "No"), 2),
    ),
    "anli_r2": (
        ("The film was released in 2004 to mixed reviews. Must it be true that critics "
         "loved it? Yes, no, or maybe?", ("Yes", "Maybe", "No"), 2),
        ("He was born in Ohio and moved to Texas. Is it guaranteed that he lived in Texas? "
         "Yes, no, or maybe?", ("Yes", "Maybe", "No"), 0),
    ),
    "anli_r3": (
        ("The bakery sells bread on weekdays. Can we infer that it sells bread on Sunday? "
         "Yes, no, or maybe?", ("Yes", "Maybe", "No"), 1),
        ("The river froze in January. Does this imply that it was cold? Yes, no, or maybe?",
         ("Yes", "Maybe", "No"), 0),
    ),
    "copa": (
        ("My body cast a shadow over the grass. What was the cause?",
         ("The sun was rising.", "The grass was cut."), 0),
        ("The woman tolerated her friend's difficult behavior. What was the cause?",
         ("The woman knew her friend was going through a hard time.",
          "The woman felt that her friend took advantage of her kindness."), 0),
    ),
    "hellaswag": (
        ("A man is sitting on a roof. He",
         ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
          "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3),
        ("A woman pours flour into a bowl. She",
         ("stirs in eggs and milk.", "paints the bowl blue.", "throws the bowl away.",
          "reads a newspaper."), 0),
    ),
    "story_cloze": (
        ("Rick grew up in a troubled household. He never found good support in family, "
         "and turned to gangs. What is the end of the story?",
         ("He is happy now.", "He joined a gang."), 0),
        ("Sam bought a new puppy. The puppy chewed his shoes. Which ending fits?",
         ("Sam bought the puppy toys to chew.", "Sam sold his house."), 0),
    ),
    "winogrande": (
        ("Sarah was a much better surgeon than Maria so _ always got the harder cases. "
         "What does the _ refer to?", ("Sarah", "Maria"), 0),
        ("The trophy doesn't fit into the suitcase because the _ is too small.",
         ("trophy", "suitcase"), 1),
    ),
    "wsc": (
        ("Mark told Pete many lies about himself. In the sentence, does the pronoun "
         "himself refer to Mark?", ("No", "Yes"), 1),
        ("The city councilmen refused the demonstrators a permit because they feared "
         "violence. Do they refer to the demonstrators?", ("No", "Yes"), 0),
    ),
    "wic": (
        ("Sentence A: He caught a cold. Sentence B: The ball was caught. Is the word "
         "catch used in the same sense?", ("No", "Yes"), 0),
        ("Sentence A: Open the window. Sentence B: Open the door. Same meaning of open?",
         ("No", "Yes"), 1),
    ),
}


def fake_t5_ids(text: str) -> list[int]:
  """Stand-in token ids for P3's `inputs` and `targets` (which the Tasks ignore)."""
  return [byte + 3 for byte in text.encode("utf-8")] + [1]


def _bytes_feature(values: Iterable[str]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")
                                                              for v in values]))


def _int_feature(values: Iterable[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _float_feature(values: Iterable[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


_TRAIN_INFO = {
    "inputs": {"shape": [None], "dtype": "int32"},
    "inputs_pretokenized": {"shape": [], "dtype": "string"},
    "targets": {"shape": [None], "dtype": "int32"},
    "targets_pretokenized": {"shape": [], "dtype": "string"},
}
_SCORE_EVAL_INFO = {
    **_TRAIN_INFO,
    "answer_choices": {"shape": [None], "dtype": "string"},
    "idx": {"shape": [None], "dtype": "int32"},
    "is_correct": {"shape": [], "dtype": "bool"},
    "weight": {"shape": [], "dtype": "float32"},
}


def _write_json(path: Path, content: Mapping[str, object]) -> None:
  path.write_text(json.dumps(content, indent=1), encoding="utf-8")


def write_split(folder: Path, split: str, records: Sequence[tf.train.Example], *,
                features: Mapping[str, object], claimed_examples: int | None = None,
                write_info: bool = True, write_stats: bool = True) -> None:
  """Writes one split: the TFRecord shard, info.<split>.json and stats.<split>.json."""
  folder.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(folder / f"{split}.tfrecord-00000-of-00001")) as writer:
    for record in records:
      writer.write(record.SerializeToString())
  if write_info:
    _write_json(folder / f"info.{split}.json",
                {"num_shards": 1, "features": dict(features), "seqio_version": "0.0.6"})
  if write_stats:
    count = len(records) if claimed_examples is None else claimed_examples
    _write_json(folder / f"stats.{split}.json",
                {"examples": count, "inputs_max_tokens": 512, "targets_max_tokens": 64})


def write_train_task(p3_dir: str | os.PathLike[str], task_name: str,
                     examples: Sequence[tuple[str, str]], *, split: str = "train",
                     claimed_examples: int | None = None, write_info: bool = True,
                     write_stats: bool = True) -> Path:
  """Writes one training prompt folder; returns it."""
  records = []
  for inputs, targets in examples:
    records.append(tf.train.Example(features=tf.train.Features(feature={
        "inputs": _int_feature(fake_t5_ids(inputs)),
        "inputs_pretokenized": _bytes_feature([inputs]),
        "targets": _int_feature(fake_t5_ids(targets)),
        "targets_pretokenized": _bytes_feature([targets]),
    })))
  folder = Path(p3_dir) / "data" / task_name
  write_split(folder, split, records, features=_TRAIN_INFO, claimed_examples=claimed_examples,
              write_info=write_info, write_stats=write_stats)
  return folder


def write_score_eval_task(p3_dir: str | os.PathLike[str], task_name: str,
                          examples: Sequence[tuple[str, Sequence[str], int]], *,
                          split: str = "validation") -> Path:
  """Writes one `_score_eval` folder: a record per (example, choice), in reverse order."""
  records = []
  for example_index, (inputs, choices, correct) in enumerate(examples):
    for choice_index, choice in enumerate(choices):
      records.append(tf.train.Example(features=tf.train.Features(feature={
          "inputs": _int_feature(fake_t5_ids(inputs)),
          "inputs_pretokenized": _bytes_feature([inputs]),
          "targets": _int_feature(fake_t5_ids(choice)),
          "targets_pretokenized": _bytes_feature([choice]),
          "answer_choices": _bytes_feature(choices),
          "idx": _int_feature([example_index, choice_index]),
          "is_correct": _int_feature([int(choice_index == correct)]),
          "weight": _float_feature([1.0]),
      })))
  folder = Path(p3_dir) / "data" / task_name
  write_split(folder, split, records[::-1], features=_SCORE_EVAL_INFO)
  return folder


@dataclasses.dataclass(frozen=True)
class T0Fixture:
  """What `write_t0_collection` wrote: the P3 folder and each task's examples."""
  p3_dir: Path
  train: dict[str, tuple[tuple[str, str], ...]]
  eval: dict[str, tuple[tuple[str, tuple[str, ...], int], ...]]


def _rotated(items: Sequence, shift: int) -> tuple:
  shift %= len(items)
  return tuple(items[shift:]) + tuple(items[:shift])


def write_t0_collection(p3_dir: str | os.PathLike[str], *,
                        claimed_examples: Mapping[str, int] | None = None) -> T0Fixture:
  """Writes all 296 training prompts and 113 evaluation prompts in P3's layout.

  Prompt j of a dataset contains that dataset's examples rotated by j, so prompts of
  one dataset differ in their first example. `claimed_examples` maps a training
  dataset key to the `examples` its stats.train.json files claim, for testing
  the mixing rule on oversized datasets.
  """
  claimed_examples = claimed_examples or {}
  train, evaluation = {}, {}
  for dataset in t0_prompts.TRAIN_DATASETS:
    for j, task_name in enumerate(dataset.p3_task_names()):
      examples = _rotated(TRAIN_TEXT[dataset.key], j)
      write_train_task(p3_dir, task_name, examples,
                       claimed_examples=claimed_examples.get(dataset.key))
      train[task_name] = examples
  for dataset in t0_prompts.EVAL_DATASETS:
    for j, task_name in enumerate(dataset.p3_task_names(score_eval=True)):
      examples = _rotated(EVAL_TEXT[dataset.key], j)
      write_score_eval_task(p3_dir, task_name, examples)
      evaluation[task_name] = examples
  return T0Fixture(Path(p3_dir), train, evaluation)


def all_fixture_text() -> list[str]:
  """Every string of the fixture texts, for training a test vocabulary."""
  texts = [text for pairs in TRAIN_TEXT.values() for pair in pairs for text in pair]
  for examples in EVAL_TEXT.values():
    for inputs, choices, _ in examples:
      texts.append(inputs)
      texts.extend(choices)
  return texts


def train_vocabulary(folder: str | os.PathLike[str], texts: Iterable[str], *,
                     vocab_size: int = 400) -> seqio.SentencePieceVocabulary:
  """Trains a small SentencePiece model with T5's special ids (pad 0, eos 1, unk 2)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(folder / "test_spm"), vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
      minloglevel=2)
  return seqio.SentencePieceVocabulary(str(folder / "test_spm.model"))
