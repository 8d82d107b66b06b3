"""Text-generation metrics: exact match, ROUGE, BLEU and SARI.

Every function takes whole corpora (one prediction per example and one or more
references per example) and returns scores on a 0-100 scale, as T5X, seqio and
the SARI paper report them.

ROUGE comes from `rouge-score` and BLEU from `sacrebleu`. SARI (Xu, Napoles,
Pavlick, Chen and Callison-Burch, "Optimizing Statistical Machine Translation for
Text Simplification", TACL 2016) is computed here, in the formulation that the
Hugging Face `evaluate` metric and tensor2tensor's `sari_hook` use:

- For each n-gram order n = 1..4, counts of the source and of the prediction are
  multiplied by the number of references, and the counts of all references are
  summed, so an n-gram kept by half of the references gets half the credit.
- KEEP is the F1 of n-grams present in both source and prediction, checked against
  the references. Its recall divides the correctly kept counts by the counts that
  the references keep from the source (the corrected recall of `evaluate`).
- DELETE is the precision only: of the source n-grams the prediction dropped, the
  share that the references dropped too.
- ADD is the F1 over n-gram types that the prediction introduced, checked against
  the types that the references introduced.
- An empty denominator counts as 1 (0/0 = 1), so a prediction equal to its only
  reference scores 100.
- Sentence SARI is the mean of the three operation scores, each averaged over
  n = 1..4. Corpus SARI is the mean of sentence SARI.
Text is lowercased and tokenized with sacrebleu's 13a tokenizer first.
"""

import collections
import re
import string
from typing import Sequence

from rouge_score import rouge_scorer
import sacrebleu
from sacrebleu.tokenizers import tokenizer_13a

References = Sequence[Sequence[str]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SARI_MAX_ORDER = 4


def _check_lengths(predictions: Sequence[str], references: References) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"got {len(predictions)} predictions but {len(references)} "
                     "reference lists; pass one reference list per prediction.")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{i}] must be a non-empty list of strings, got "
                       f"{refs!r}.")


def normalize_answer(text: str) -> str:
  """Lowercases, drops punctuation and the articles a/an/the, squeezes spaces.

  This is the SQuAD normalization, used for exact match.
  """
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: References) -> float:
  """Percentage of predictions equal to any reference after `normalize_answer`."""
  _check_lengths(predictions, references)
  if not predictions:
    return 0.0
  hits = 0
  for prediction, refs in zip(predictions, references):
    normalized = normalize_answer(prediction)
    hits += any(normalized == normalize_answer(ref) for ref in refs)
  return 100.0 * hits / len(predictions)


def rouge(predictions: Sequence[str], references: References,
          rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL")
          ) -> dict[str, float]:
  """Mean ROUGE F-measure per type, best reference per example, Porter stemming."""
  _check_lengths(predictions, references)
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)
  totals = {name: 0.0 for name in rouge_types}
  for prediction, refs in zip(predictions, references):
    # score_multi keeps, per type, the reference with the best F-measure.
    scores = scorer.score_multi(list(refs), prediction)
    for name in rouge_types:
      totals[name] += scores[name].fmeasure
  count = max(len(predictions), 1)
  return {name: 100.0 * total / count for name, total in totals.items()}


def bleu(predictions: Sequence[str], references: References) -> float:
  """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing).

  Examples may have different numbers of references; missing ones are passed to
  sacrebleu as None, which it skips.
  """
  _check_lengths(predictions, references)
  num_streams = max((len(refs) for refs in references), default=1)
  streams = [[refs[k] if k < len(refs) else None for refs in references]
             for k in range(num_streams)]
  return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def _sari_tokens(text: str, tokenizer: tokenizer_13a.Tokenizer13a) -> list[str]:
  return tokenizer(text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(
      tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(precision: float, recall: float) -> float:
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def _sari_order(source: collections.Counter, prediction: collections.Counter,
                reference_total: collections.Counter,
                num_references: int) -> tuple[float, float, float]:
  """Returns (keep F1, delete precision, add F1) for one n-gram order."""
  source_rep = collections.Counter(
      {gram: count * num_references for gram, count in source.items()})
  prediction_rep = collections.Counter(
      {gram: count * num_references for gram, count in prediction.items()})

  # KEEP: n-grams of the source that the prediction also contains.
  kept = source_rep & prediction_rep
  kept_good = kept & reference_total
  kept_by_references = source_rep & reference_total
  keep_precision = 1.0
  if kept:
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept)
  keep_recall = 1.0
  if kept_by_references:
    keep_recall = sum(kept_good.values()) / sum(kept_by_references.values())

  # DELETE: source counts the prediction dropped (Counter subtraction keeps
  # positive parts only); precision alone, as in the paper.
  deleted = source_rep - prediction_rep
  deleted_good = deleted - reference_total
  delete_precision = 1.0
  if deleted:
    delete_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted)

  # ADD: n-gram types new in the prediction, against types new in the references.
  added = set(prediction) - set(source)
  added_by_references = set(reference_total) - set(source)
  added_good = added & added_by_references
  add_precision = len(added_good) / len(added) if added else 1.0
  add_recall = len(added_good) / len(added_by_references) if added_by_references else 1.0

  return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari_sentence(source: str, prediction: str, references: Sequence[str]
                  ) -> dict[str, float]:
  """SARI of one prediction, with its KEEP, DELETE and ADD parts (0-100)."""
  tokenizer = tokenizer_13a.Tokenizer13a()
  source_tokens = _sari_tokens(source, tokenizer)
  prediction_tokens = _sari_tokens(prediction, tokenizer)
  reference_tokens = [_sari_tokens(ref, tokenizer) for ref in references]
  keep = delete = add = 0.0
  for n in range(1, _SARI_MAX_ORDER + 1):
    reference_total = collections.Counter()
    for tokens in reference_tokens:
      reference_total.update(_ngrams(tokens, n))
    k, d, a = _sari_order(_ngrams(source_tokens, n), _ngrams(prediction_tokens, n),
                          reference_total, len(references))
    keep += k
    delete += d
    add += a
  keep, delete, add = (x / _SARI_MAX_ORDER for x in (keep, delete, add))
  return {"sari": 100.0 * (keep + delete + add) / 3, "keep": 100.0 * keep,
          "del": 100.0 * delete, "add": 100.0 * add}


def sari(sources: Sequence[str], predictions: Sequence[str], references: References
         ) -> dict[str, float]:
  """Corpus SARI: the mean of `sari_sentence` over examples (0-100)."""
  _check_lengths(predictions, references)
  if len(sources) != len(predictions):
    raise ValueError(f"got {len(sources)} sources but {len(predictions)} predictions; "
                     "pass one source per prediction.")
  totals = collections.Counter()
  for source, prediction, refs in zip(sources, predictions, references):
    totals.update(sari_sentence(source, prediction, refs))
  count = max(len(predictions), 1)
  return {name: totals[name] / count for name in ("sari", "keep", "del", "add")}


METRICS = ("exact_match", "rouge", "bleu", "sari")


def compute_metrics(names: Sequence[str], *, predictions: Sequence[str],
                    references: References,
                    sources: Sequence[str] | None = None) -> dict[str, float]:
  """Computes the named metrics, flattened to one dict (`rouge1`, `bleu`, ...)."""
  results: dict[str, float] = {}
  for name in names:
    if name == "exact_match":
      results["exact_match"] = exact_match(predictions, references)
    elif name == "rouge":
      results.update(rouge(predictions, references))
    elif name == "bleu":
      results["bleu"] = bleu(predictions, references)
    elif name == "sari":
      if sources is None:
        raise ValueError("SARI needs the source texts; pass sources=.")
      results.update({f"sari_{k}" if k != "sari" else k: v
                      for k, v in sari(sources, predictions, references).items()})
    else:
      raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}.")
  return results
