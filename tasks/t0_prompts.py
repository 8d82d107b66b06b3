"""The T0 prompt collection: training datasets, evaluation datasets, prompt names.

This module is data only: it reads no files. Names follow promptsource 0.2.3
(`dataset`, `subset`, template `name` in `<dataset>[/<subset>]/templates.yaml`)
and the P3 release, whose folder for a prompt is `p3_task_name(...)`.

The training collection is T0's (Sanh et al., 2021, "Multitask Prompted Training
Enables Zero-Shot Task Generalization"), as the Expert Language Models paper (Jang
et al., ICML 2023) uses it. It has 36 datasets with 296 prompts, and the paper
trains one Prompt Expert per prompt and one Dataset Expert per dataset. The evaluation collection is
T0's 11 held-out datasets with 113 prompts; the three ANLI rounds share the 15
ANLI templates of promptsource and differ in their split (`dev_r1`, `dev_r2`,
`dev_r3`).
"""

import dataclasses
import re

# Prompt Experts train on at most this many instances per prompt, and on at most
# SUMMARIZATION_MAX_TRAIN_EXAMPLES for the summarization datasets below.
MAX_TRAIN_EXAMPLES = 50_000
SUMMARIZATION_MAX_TRAIN_EXAMPLES = 10_000
# Prompt Expert inputs are trimmed to this many tokens, or to
# LONG_CONTEXT_INPUT_LENGTH for the long-context datasets below; targets to 128.
INPUT_LENGTH = 256
LONG_CONTEXT_INPUT_LENGTH = 512
TARGET_LENGTH = 128

# Summarization datasets of the T0 training collection.
SUMMARIZATION_KEYS = frozenset(
    {"xsum", "cnn_dailymail", "gigaword", "multi_news", "samsum"})
# Datasets whose prompted inputs (articles, plots, multi-document passages) are
# mostly longer than 256 tokens.
# NOTE: this list is this project's reading of the data; the reference code's
# own list was not available to check it against.
LONG_CONTEXT_KEYS = frozenset({
    "xsum", "cnn_dailymail", "multi_news", "duorc", "quail", "quoref",
    "wiki_hop", "hotpot_qa",
})


@dataclasses.dataclass(frozen=True)
class T0Dataset:
  """One dataset of the T0 collection and its prompts.

  Attributes:
    key: short snake_case name used in Mixture and expert names, e.g. `cos_e`.
    dataset: the Hugging Face / promptsource dataset name, e.g. `cos_e`.
    subset: the dataset configuration, e.g. `v1.11`, or None.
    prompts: promptsource 0.2.3 template names, in the collection's order.
    split: the Hugging Face split the prompts are applied to.
    p3_split: the split name of the P3 files that hold this split.
    p3_suffix: appended to the P3 task name; `_r1` .. `_r3` for the ANLI rounds.
    summarization: Prompt Experts of this dataset use the smaller training cap.
    long_context: Prompt Experts of this dataset take 512-token inputs.
  """
  key: str
  dataset: str
  subset: str | None
  prompts: tuple[str, ...]
  split: str = "train"
  p3_split: str = "train"
  p3_suffix: str = ""
  summarization: bool = False
  long_context: bool = False

  @property
  def promptsource_path(self) -> str:
    """`dataset[/subset]`, the templates folder of promptsource."""
    return self.dataset if self.subset is None else f"{self.dataset}/{self.subset}"

  @property
  def max_train_examples(self) -> int:
    return SUMMARIZATION_MAX_TRAIN_EXAMPLES if self.summarization else MAX_TRAIN_EXAMPLES

  @property
  def input_length(self) -> int:
    return LONG_CONTEXT_INPUT_LENGTH if self.long_context else INPUT_LENGTH

  def prompt_id(self, template: str) -> str:
    """`dataset[/subset]@template`, one prompt's name across the project."""
    return f"{self.promptsource_path}@{template}"

  def p3_task_name(self, template: str, *, score_eval: bool = False) -> str:
    return p3_task_name(self.dataset, self.subset, template, suffix=self.p3_suffix,
                        score_eval=score_eval)

  def p3_task_names(self, *, score_eval: bool = False) -> tuple[str, ...]:
    return tuple(self.p3_task_name(t, score_eval=score_eval) for t in self.prompts)


def p3_task_name(dataset: str, subset: str | None, template: str, *, suffix: str = "",
                 score_eval: bool = False) -> str:
  """Returns the P3 task (and folder) name of one prompt.

  P3 joins `dataset`, `subset` and the template name with underscores and then
  replaces every run of characters other than letters, digits, `.` and `_` with
  one `_`: `super_glue/rte@GPT-3 style` becomes `super_glue_rte_GPT_3_style`.
  The ANLI rounds add `_r1`..`_r3` after the template; scoring variants end in
  `_score_eval`.
  """
  joined = f"{dataset}_{subset}_{template}" if subset else f"{dataset}_{template}"
  name = re.sub(r"[^\w.]+", "_", joined) + suffix
  return name + "_score_eval" if score_eval else name


def _train(key: str, dataset: str, subset: str | None, prompts: tuple[str, ...]) -> T0Dataset:
  return T0Dataset(key=key, dataset=dataset, subset=subset, prompts=prompts,
                   summarization=key in SUMMARIZATION_KEYS,
                   long_context=key in LONG_CONTEXT_KEYS)


# Four template names below end in a space, as they do in promptsource 0.2.3:
# `imdb@Sentiment with choices ` is the template's real name, and its P3 folder
# is `imdb_Sentiment_with_choices_`.
TRAIN_DATASETS: tuple[T0Dataset, ...] = (
    _train("xsum", "xsum", None, (
        "DOC_boils_down_to_simple_idea_that",
        "DOC_given_above_write_one_sentence",
        "DOC_how_would_you_rephrase_few_words",
        "DOC_tldr",
        "DOC_write_summary_of_above",
        "article_DOC_summary",
        "college_roommate_asked_DOC_so_I_recap",
        "read_below_DOC_write_abstract",
        "summarize_DOC",
        "summarize_this_DOC_summary",
    )),
    _train("trec", "trec", None, (
        "fine_grained_ABBR",
        "fine_grained_ABBR_context_first",
        "fine_grained_DESC",
        "fine_grained_DESC_context_first",
        "fine_grained_ENTY",
        "fine_grained_HUM",
        "fine_grained_HUM_context_first",
        "fine_grained_LOC",
        "fine_grained_LOC_context_first",
        "fine_grained_NUM",
        "fine_grained_NUM_context_first",
        "fine_grained_open",
        "fine_grained_open_context_first",
        "pick_the_best_descriptor",
        "trec1",
        "trec2",
        "what_category_best_describe",
        "which_category_best_describes",
    )),
    _train("cos_e", "cos_e", "v1.11", (
        "aligned_with_common_sense",
        "description_question_option_id",
        "description_question_option_text",
        "explain_why_human",
        "generate_explanation_given_text",
        "i_think",
        "question_description_option_id",
        "question_description_option_text",
        "question_option_description_id",
        "question_option_description_text",
        "rationale",
    )),
    _train("commonsense_qa", "commonsense_qa", None, (
        "answer_given_question_without_options",
        "answer_to_question",
        "most_suitable_answer",
        "question_answering",
        "question_to_answer_index",
    )),
    _train("dream", "dream", None, (
        "answer-to-dialogue",
        "baseline",
        "generate-first-utterance",
        "generate-last-utterance",
        "read_the_following_conversation_and_answer_the_question",
    )),
    _train("quail", "quail", None, (
        "context_description_question_answer_id",
        "context_description_question_answer_text",
        "context_description_question_text",
        "context_question_answer_description_id",
        "context_question_answer_description_text",
        "context_question_description_answer_id",
        "context_question_description_answer_text",
        "context_question_description_text",
        "description_context_question_answer_id",
        "description_context_question_answer_text",
        "description_context_question_text",
        "no_prompt_id",
        "no_prompt_text",
    )),
    _train("quartz", "quartz", None, (
        "answer_question_based_on",
        "answer_question_below",
        "given_the_fact_answer_the_q",
        "having_read_above_passage",
        "paragraph_question_plain_concat",
        "read_passage_below_choose",
        "use_info_from_paragraph_question",
        "use_info_from_question_paragraph",
    )),
    _train("social_i_qa", "social_i_qa", None, (
        "Check if a random answer is valid or not",
        "Generate answer",
        "Generate the question from the answer",
        "I was wondering",
        "Show choices and generate answer",
        "Show choices and generate index",
    )),
    _train("wiqa", "wiqa", None, (
        "does_the_supposed_perturbation_have_an_effect",
        "effect_with_label_answer",
        "effect_with_string_answer",
        "what_is_the_final_step_of_the_following_process",
        "what_is_the_missing_first_step",
        "what_might_be_the_first_step_of_the_process",
        "what_might_be_the_last_step_of_the_process",
        "which_of_the_following_is_the_supposed_perturbation",
    )),
    _train("cosmos_qa", "cosmos_qa", None, (
        "context_answer_to_question",
        "context_description_question_answer_id",
        "context_description_question_answer_text",
        "context_description_question_text",
        "context_question_description_answer_id",
        "context_question_description_answer_text",
        "context_question_description_text",
        "description_context_question_answer_id",
        "description_context_question_answer_text",
        "description_context_question_text",
        "no_prompt_id",
        "no_prompt_text",
        "only_question_answer",
    )),
    _train("qasc", "qasc", None, (
        "is_correct_1",
        "is_correct_2",
        "qa_with_combined_facts_1",
        "qa_with_separated_facts_1",
        "qa_with_separated_facts_2",
        "qa_with_separated_facts_3",
        "qa_with_separated_facts_4",
        "qa_with_separated_facts_5",
    )),
    _train("quarel", "quarel", None, (
        "choose_between",
        "do_not_use",
        "heres_a_story",
        "logic_test",
        "testing_students",
    )),
    _train("sciq", "sciq", None, (
        "Direct Question",
        "Direct Question (Closed Book)",
        "Multiple Choice",
        "Multiple Choice (Closed Book)",
        "Multiple Choice Question First",
    )),
    _train("wiki_hop", "wiki_hop", "original", (
        "choose_best_object_affirmative_1",
        "choose_best_object_affirmative_2",
        "choose_best_object_affirmative_3",
        "choose_best_object_interrogative_1",
        "choose_best_object_interrogative_2",
        "explain_relation",
        "generate_object",
        "generate_subject",
        "generate_subject_and_object",
    )),
    _train("amazon_polarity", "amazon_polarity", None, (
        "Is_this_product_review_positive",
        "Is_this_review",
        "Is_this_review_negative",
        "User_recommend_this_product",
        "convey_negative_or_positive_sentiment",
        "flattering_or_not",
        "negative_or_positive_tone",
        "user_satisfied",
        "would_you_buy",
    )),
    _train("app_reviews", "app_reviews", None, (
        "categorize_rating_using_review",
        "convert_to_rating",
        "convert_to_star_rating",
        "generate_review",
    )),
    _train("imdb", "imdb", None, (
        "Movie Expressed Sentiment",
        "Movie Expressed Sentiment 2",
        "Negation template for positive and negative",
        "Reviewer Enjoyment",
        "Reviewer Enjoyment Yes No",
        "Reviewer Expressed Sentiment",
        "Reviewer Opinion bad good choices",
        "Reviewer Sentiment Feeling",
        "Sentiment with choices ",
        "Text Expressed Sentiment",
        "Writer Expressed Sentiment",
    )),
    _train("rotten_tomatoes", "rotten_tomatoes", None, (
        "Movie Expressed Sentiment",
        "Movie Expressed Sentiment 2",
        "Reviewer Enjoyment",
        "Reviewer Enjoyment Yes No",
        "Reviewer Expressed Sentiment",
        "Reviewer Opinion bad good choices",
        "Reviewer Sentiment Feeling",
        "Sentiment with choices ",
        "Text Expressed Sentiment",
        "Writer Expressed Sentiment",
    )),
    _train("yelp_review_full", "yelp_review_full", None, (
        "based_on_that",
        "format_rating",
        "format_score",
        "format_star",
        "on_a_scale",
        "so_i_would",
        "this_place",
    )),
    _train("paws", "paws", "labeled_final", (
        "Concatenation",
        "Concatenation-no-label",
        "Meaning",
        "Meaning-no-label",
        "PAWS-ANLI GPT3",
        "PAWS-ANLI GPT3-no-label",
        "Rewrite",
        "Rewrite-no-label",
        "context-question",
        "context-question-no-label",
        "paraphrase-task",
        "task_description-no-label",
    )),
    _train("glue_qqp", "glue", "qqp", (
        "answer",
        "duplicate",
        "duplicate or not",
        "meaning",
        "quora",
        "same thing",
    )),
    _train("glue_mrpc", "glue", "mrpc", (
        "equivalent",
        "generate_paraphrase",
        "generate_sentence",
        "paraphrase",
        "replace",
        "same thing",
        "want to know",
    )),
    _train("ag_news", "ag_news", None, (
        "classify",
        "classify_question_first",
        "classify_with_choices",
        "classify_with_choices_question_first",
        "recommend",
        "which_section",
        "which_section_choices",
    )),
    _train("dbpedia_14", "dbpedia_14", None, (
        "given_a_choice_of_categories ",
        "given_a_list_of_category_what_does_the_title_belong_to",
        "given_list_what_category_does_the_paragraph_belong_to",
        "pick_one_category_for_the_following_text",
    )),
    _train("adversarial_qa", "adversarial_qa", "adversarialQA", (
        "answer_the_following_q",
        "based_on",
        "generate_question",
        "question_context_answer",
        "tell_what_it_is",
    )),
    _train("quoref", "quoref", None, (
        "Answer Friend Question",
        "Answer Question Given Context",
        "Answer Test",
        "Context Contains Answer",
        "Find Answer",
        "Found Context Online",
        "Given Context Answer Question",
        "Guess Answer",
        "Guess Title For Context",
        "Read And Extract ",
        "What Is The Answer",
    )),
    _train("ropes", "ropes", None, (
        "background_new_situation_answer",
        "background_situation_middle",
        "given_background_situation",
        "new_situation_background_answer",
        "plain_background_situation",
        "plain_bottom_hint",
        "plain_no_background",
        "prompt_beginning",
        "prompt_bottom_hint_beginning",
        "prompt_bottom_no_hint",
        "prompt_mix",
        "read_background_situation",
    )),
    _train("duorc", "duorc", "ParaphraseRC", (
        "answer_question",
        "build_story_around_qa",
        "decide_worth_it",
        "extract_answer",
        "generate_question",
        "generate_question_by_answer",
        "movie_director",
        "question_answering",
        "title_generation",
    )),
    _train("hotpot_qa", "hotpot_qa", "fullwiki", (
        "classify_question_type",
        "generate_answer_affirmative",
        "generate_answer_interrogative",
        "generate_explanations_affirmative",
        "generate_question",
        "generate_title_affirmative",
    )),
    _train("wiki_qa", "wiki_qa", None, (
        "Decide_good_answer",
        "Direct Answer to Question",
        "Generate Question from Topic",
        "Is This True?",
        "Jeopardy style",
        "Topic Prediction - Answer Only",
        "Topic Prediction - Question Only",
        "Topic Prediction - Question and Answer Pair",
        "automatic_system",
        "exercise",
        "found_on_google",
    )),
    _train("common_gen", "common_gen", None, (
        "Example prompt",
        "Given concepts - type 2",
        "Given concepts type 1",
        "Put together",
        "choice in concept centric sentence generation",
        "random task template prompt",
        "sentence to concepts",
        "topic to sentence",
        "topics from the sentence",
    )),
    _train("wiki_bio", "wiki_bio", None, (
        "who",
    )),
    _train("cnn_dailymail", "cnn_dailymail", "3.0.0", (
        "2_or_3_sentences",
        "generate_story",
        "news_card_view",
        "news_stock",
        "news_summary",
        "spice_up_story",
        "sum_in_brief",
        "tldr_summary",
        "write_an_outline",
    )),
    _train("gigaword", "gigaword", None, (
        "TLDR",
        "first_sentence_title",
        "generate_summary_for_this",
        "in_a_nutshell",
        "make_a_title",
        "reverse_writing",
        "write_a_title_for_this_sentence",
        "write_an_article",
        "write_its_sentence",
    )),
    _train("multi_news", "multi_news", None, (
        "distill",
        "expand (reverse task)",
        "summarize",
        "summary scenario",
        "synthesize",
        "what are the key points",
    )),
    _train("samsum", "samsum", None, (
        "Generate a summary for this dialogue",
        "Given the above dialogue write a summary",
        "Sum up the following dialogue",
        "Summarize this dialogue:",
        "Summarize:",
        "To sum up this dialog",
        "Write a dialogue that match this summary",
    )),
)

# The 15 ANLI templates; each round applies all of them to its own split.
_ANLI_PROMPTS = (
    "MNLI crowdsource",
    "should assume",
    "does it follow that",
    "GPT-3 style",
    "based on the previous passage",
    "justified in saying",
    "take the following as truth",
    "must be true",
    "can we infer",
    "guaranteed/possible/impossible",
    "always/sometimes/never",
    "does this imply",
    "consider always/sometimes/never",
    "claim true/false/inconclusive",
    "guaranteed true",
)


def _eval(key: str, dataset: str, subset: str | None, prompts: tuple[str, ...], *,
          split: str = "validation", p3_suffix: str = "") -> T0Dataset:
  # P3 names the split of every evaluation file `validation`, including ANLI's
  # `dev_r*` splits.
  return T0Dataset(key=key, dataset=dataset, subset=subset, prompts=prompts, split=split,
                   p3_split="validation", p3_suffix=p3_suffix)


# T0's held-out evaluation datasets; each is evaluated on its validation split.
EVAL_DATASETS: tuple[T0Dataset, ...] = (
    _eval("rte", "super_glue", "rte", (
        "MNLI crowdsource",
        "guaranteed true",
        "can we infer",
        "GPT-3 style",
        "does this imply",
        "should assume",
        "does it follow that",
        "based on the previous passage",
        "justified in saying",
        "must be true",
    )),
    _eval("cb", "super_glue", "cb", (
        "can we infer",
        "based on the previous passage",
        "claim true/false/inconclusive",
        "does it follow that",
        "justified in saying",
        "always/sometimes/never",
        "GPT-3 style",
        "consider always/sometimes/never",
        "guaranteed true",
        "must be true",
        "guaranteed/possible/impossible",
        "does this imply",
        "MNLI crowdsource",
        "should assume",
        "take the following as truth",
    )),
    _eval("anli_r1", "anli", None, _ANLI_PROMPTS, split="dev_r1", p3_suffix="_r1"),
    _eval("anli_r2", "anli", None, _ANLI_PROMPTS, split="dev_r2", p3_suffix="_r2"),
    _eval("anli_r3", "anli", None, _ANLI_PROMPTS, split="dev_r3", p3_suffix="_r3"),
    _eval("copa", "super_glue", "copa", (
        "exercise",
        "i_am_hesitating",
        "plausible_alternatives",
        "C1 or C2? premise, so/because\u2026",
        "best_option",
        "more likely",
        "cause_effect",
        "choose",
    )),
    _eval("hellaswag", "hellaswag", None, (
        "complete_first_then",
        "Randomized prompts template",
        "Predict ending with hint",
        "how_ends",
        "if_begins_how_continues",
    )),
    _eval("story_cloze", "story_cloze", "2016", (
        "Answer Given options",
        "Choose Story Ending",
        "Movie What Happens Next",
        "Story Continuation and Options",
        "Novel Correct Ending",
    )),
    _eval("winogrande", "winogrande", "winogrande_xl", (
        "does underscore refer to",
        "stand for",
        "underscore refer to",
        "fill in the blank",
        "Replace",
    )),
    _eval("wsc", "super_glue", "wsc.fixed", (
        "does the pronoun refer to",
        "by p they mean",
        "in other words",
        "I think they mean",
        "does p stand for",
        "GPT-3 Style",
        "replaced with",
        "p is/are r",
        "the pronoun refers to",
        "Who or what is/are",
    )),
    _eval("wic", "super_glue", "wic", (
        "question-context-meaning-with-label",
        "question-context-meaning",
        "grammar_homework",
        "affirmation_true_or_false",
        "GPT-3-prompt",
        "same_sense",
        "question-context",
        "GPT-3-prompt-with-label",
        "polysemous",
        "similar-sense",
    )),
)


def train_dataset(key: str) -> T0Dataset:
  """Returns the training dataset with this key, e.g. `cos_e` or `glue_qqp`."""
  return _by_key(TRAIN_DATASETS, key, "training")


def eval_dataset(key: str) -> T0Dataset:
  """Returns the evaluation dataset with this key, e.g. `rte` or `anli_r2`."""
  return _by_key(EVAL_DATASETS, key, "evaluation")


def _by_key(datasets: tuple[T0Dataset, ...], key: str, kind: str) -> T0Dataset:
  for dataset in datasets:
    if dataset.key == key:
      return dataset
  keys = ", ".join(d.key for d in datasets)
  raise KeyError(f"No T0 {kind} dataset has the key {key!r}; expected one of: {keys}.")


def train_prompt_ids() -> tuple[str, ...]:
  """Returns the 296 training prompts as `dataset[/subset]@template`."""
  return tuple(d.prompt_id(t) for d in TRAIN_DATASETS for t in d.prompts)


def eval_prompt_ids() -> tuple[str, ...]:
  """Returns the 113 evaluation prompts as `dataset[/subset]@template`.

  The 15 ANLI prompts appear once per round.
  """
  return tuple(d.prompt_id(t) for d in EVAL_DATASETS for t in d.prompts)
