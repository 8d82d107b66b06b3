"""Tests of the T0 collection data: counts, names, and their presence in promptsource."""

import collections

import pytest

from elm_jax.tasks import promptsource
from elm_jax.tasks import t0_prompts

# Prompts per training dataset, as the Expert Language Models paper lists them.
EXPECTED_TRAIN_COUNTS = {
    "xsum": 10, "trec": 18, "cos_e": 11, "commonsense_qa": 5, "dream": 5, "quail": 13,
    "quartz": 8, "social_i_qa": 6, "wiqa": 8, "cosmos_qa": 13, "qasc": 8, "quarel": 5,
    "sciq": 5, "wiki_hop": 9, "amazon_polarity": 9, "app_reviews": 4, "imdb": 11,
    "rotten_tomatoes": 10, "yelp_review_full": 7, "paws": 12, "glue_qqp": 6,
    "glue_mrpc": 7, "ag_news": 7, "dbpedia_14": 4, "adversarial_qa": 5, "quoref": 11,
    "ropes": 12, "duorc": 9, "hotpot_qa": 6, "wiki_qa": 11, "common_gen": 9, "wiki_bio": 1,
    "cnn_dailymail": 9, "gigaword": 9, "multi_news": 6, "samsum": 7,
}
# Prompts per held-out evaluation dataset (RTE, CB, ANLI R1-R3, COPA, HellaSwag,
# StoryCloze, Winogrande, WSC, WiC).
EXPECTED_EVAL_COUNTS = {
    "rte": 10, "cb": 15, "anli_r1": 15, "anli_r2": 15, "anli_r3": 15, "copa": 8,
    "hellaswag": 5, "story_cloze": 5, "winogrande": 5, "wsc": 10, "wic": 10,
}
EXPECTED_SUBSETS = {
    "cos_e": "v1.11", "wiki_hop": "original", "paws": "labeled_final",
    "adversarial_qa": "adversarialQA", "duorc": "ParaphraseRC", "hotpot_qa": "fullwiki",
    "cnn_dailymail": "3.0.0", "glue_qqp": "qqp", "glue_mrpc": "mrpc",
}
EXPECTED_EVAL_SOURCES = {
    "rte": ("super_glue", "rte", "validation"),
    "cb": ("super_glue", "cb", "validation"),
    "anli_r1": ("anli", None, "dev_r1"),
    "anli_r2": ("anli", None, "dev_r2"),
    "anli_r3": ("anli", None, "dev_r3"),
    "copa": ("super_glue", "copa", "validation"),
    "hellaswag": ("hellaswag", None, "validation"),
    "story_cloze": ("story_cloze", "2016", "validation"),
    "winogrande": ("winogrande", "winogrande_xl", "validation"),
    "wsc": ("super_glue", "wsc.fixed", "validation"),
    "wic": ("super_glue", "wic", "validation"),
}


def test_train_dataset_count():
  assert len(t0_prompts.TRAIN_DATASETS) == 36


def test_train_prompt_counts_per_dataset():
  counts = {d.key: len(d.prompts) for d in t0_prompts.TRAIN_DATASETS}
  assert counts == EXPECTED_TRAIN_COUNTS


def test_train_prompt_total():
  assert len(t0_prompts.train_prompt_ids()) == 296


def test_train_subsets():
  for key, subset in EXPECTED_SUBSETS.items():
    assert t0_prompts.train_dataset(key).subset == subset, key


def test_eval_prompt_counts_per_dataset():
  counts = {d.key: len(d.prompts) for d in t0_prompts.EVAL_DATASETS}
  assert counts == EXPECTED_EVAL_COUNTS


def test_eval_prompt_total():
  assert len(t0_prompts.eval_prompt_ids()) == 113


def test_eval_dataset_sources():
  for key, (dataset, subset, split) in EXPECTED_EVAL_SOURCES.items():
    found = t0_prompts.eval_dataset(key)
    assert (found.dataset, found.subset, found.split) == (dataset, subset, split), key


def test_anli_rounds_share_prompts():
  rounds = [t0_prompts.eval_dataset(f"anli_r{r}") for r in (1, 2, 3)]
  assert rounds[0].prompts == rounds[1].prompts == rounds[2].prompts
  assert [d.p3_suffix for d in rounds] == ["_r1", "_r2", "_r3"]
  assert {d.p3_split for d in rounds} == {"validation"}


def test_prompts_unique_within_dataset():
  for dataset in (*t0_prompts.TRAIN_DATASETS, *t0_prompts.EVAL_DATASETS):
    duplicates = [n for n, c in collections.Counter(dataset.prompts).items() if c > 1]
    assert not duplicates, (dataset.key, duplicates)


def test_keys_unique():
  train_keys = [d.key for d in t0_prompts.TRAIN_DATASETS]
  eval_keys = [d.key for d in t0_prompts.EVAL_DATASETS]
  assert len(set(train_keys)) == len(train_keys)
  assert len(set(eval_keys)) == len(eval_keys)


def test_p3_names_unique_after_sanitizing():
  names = [n for d in t0_prompts.TRAIN_DATASETS for n in d.p3_task_names()]
  names += [n for d in t0_prompts.EVAL_DATASETS for n in d.p3_task_names(score_eval=True)]
  assert len(set(names)) == 296 + 113


@pytest.mark.parametrize("dataset,subset,template,suffix,score_eval,expected", [
    ("super_glue", "rte", "GPT-3 style", "", False, "super_glue_rte_GPT_3_style"),
    ("super_glue", "wsc.fixed", "p is/are r", "", True,
     "super_glue_wsc.fixed_p_is_are_r_score_eval"),
    ("super_glue", "copa", "C1 or C2? premise, so/because\u2026", "", True,
     "super_glue_copa_C1_or_C2_premise_so_because__score_eval"),
    ("anli", None, "GPT-3 style", "_r2", True, "anli_GPT_3_style_r2_score_eval"),
    ("dbpedia_14", None, "given_a_choice_of_categories ", "", False,
     "dbpedia_14_given_a_choice_of_categories_"),
    ("cos_e", "v1.11", "i_think", "", False, "cos_e_v1.11_i_think"),
])
def test_p3_task_name(dataset, subset, template, suffix, score_eval, expected):
  assert t0_prompts.p3_task_name(dataset, subset, template, suffix=suffix,
                                 score_eval=score_eval) == expected


def test_trailing_space_names_kept():
  assert "Sentiment with choices " in t0_prompts.train_dataset("imdb").prompts
  assert "Read And Extract " in t0_prompts.train_dataset("quoref").prompts


def test_every_prompt_exists_in_promptsource(promptsource_dir):
  missing = []
  for dataset in (*t0_prompts.TRAIN_DATASETS, *t0_prompts.EVAL_DATASETS):
    templates = promptsource.load_templates(dataset.dataset, dataset.subset,
                                            templates_dir=promptsource_dir)
    missing += [dataset.prompt_id(t) for t in dataset.prompts if t not in templates]
  assert not missing


def test_eval_prompts_have_answer_choices(promptsource_dir):
  # Rank classification scores the answer choices, so every evaluation template needs them.
  without = []
  for dataset in t0_prompts.EVAL_DATASETS:
    templates = promptsource.load_templates(dataset.dataset, dataset.subset,
                                            templates_dir=promptsource_dir)
    without += [dataset.prompt_id(t) for t in dataset.prompts
                if templates[t].answer_choices is None]
  assert not without


def test_summarization_and_long_context_flags():
  keys = {d.key for d in t0_prompts.TRAIN_DATASETS}
  assert t0_prompts.SUMMARIZATION_KEYS <= keys
  assert t0_prompts.LONG_CONTEXT_KEYS <= keys
  assert t0_prompts.train_dataset("samsum").max_train_examples == 10_000
  assert t0_prompts.train_dataset("cosmos_qa").max_train_examples == 50_000
  assert t0_prompts.train_dataset("duorc").input_length == 512
  assert t0_prompts.train_dataset("imdb").input_length == 256


def test_unknown_key_lists_keys():
  with pytest.raises(KeyError, match="glue_qqp"):
    t0_prompts.train_dataset("qqp")
