"""Sweeps: the logit prisms of every prompt of a data set, and their means over the set with bootstrap intervals.

One prompt is an anecdote; "this head moves the country into the capital's logit" is a claim about a data set.
`sweep` (the `refprism sweep` command) reads a JSONL or CSV file of prompts, runs them in packed passes
(`Model.run_many`), splits each prompt's readout with the prisms of refprism/prisms/, writes one line per prompt
as each chunk of prompts is done, and aggregates (docs/sweeps.md).

Data, one row per prompt:
    id              unique name of the row (a string or an integer)
    prompt | ids    the text (the tokenizer adds BOS) or the token ids
    targets         token specs as prisms.resolve_token reads them: ▁Paris, one-token text, #7127
    versus          optional foils: each column reads target - mean(foils)
    position        optional read position (default -1, the last token)
    roles           optional {"country": 5}: names of source positions, so that head x source terms aggregate
                    by role across prompts of different lengths; the sources without a role form "other"
    counterfactual  optional: passed to refprism.interventions.validate with --validate

Levels, what each prompt gets (`Levels.parse("residual,heads,head-source,neurons:10")`):
    residual     embed, L{l}.attn, L{l}.mlp                       whole: the logit (or logit difference)
    heads        L{l}H{h}: each head, sources summed               whole: the L{l}.attn term
    head-source  L{l}H{h}.src{s}, and by role: L{l}H{h}.{role}, L{l}H{h}.other     whole: the L{l}.attn term
    neurons:K    each prompt's K neurons of largest |term| in each layer, L{l}N{n}, and L{l}N.rest, the sum of
                 its other neurons                                 whole: the L{l}.mlp term

Aggregation (summary.json). For a component c and column z, x_i = the term of prompt i, i = 1 .. n:
    mean       m = (1/n) sum_i x_i
    interval   percentile bootstrap: B resamples of the n prompts drawn with replacement, as counts
               w_b ~ Multinomial(n; 1/n, ..., 1/n); the resample means m_b = (1/n) sum_i w_bi x_i; the 95% interval
               is [2.5th, 97.5th percentile of m_b]. One set of resamples serves every component (a resample is a
               set of prompts), so intervals of different components come from the same draws.
    same_sign  (1/n) #{i : sign(x_i) = sign(m)}, the share of prompts that agree with the sign of the mean.
Exactness holds for the means. Every prompt's parts sum to its whole up to rounding,
whole_i = sum_c x_ic + r_i with |r_i| <= tol_i, and the mean is linear, so

    mean_i whole_i = sum_c mean_i x_ic + mean_i r_i,    |mean_i r_i| <= mean_i tol_i:

the mean terms decompose the mean whole, and summary.json reports that residual beside its tolerance. A role
that a prompt does not name is an empty set of its sources: its term there is 0, which keeps every prompt's sum.

Neurons across the data set. Each prompt keeps its own top K in prompts.jsonl, but a neuron in one prompt's top K
is usually not in every other's. The sweep therefore also keeps every neuron's exact term of every prompt, in
binary side files (neurons/part-*.npz, [P, L, F, Z]), and the summary aggregates, per layer, the union U_l of
the prompts' top-K sets and the K neurons of largest |mean| (a neuron that matters a little in every prompt but
most in none), each with its exact term in every prompt, plus L{l}N.rest = the sum over the neurons outside U_l.

Output folder (`--out DIR`): sweep.json (the settings; a re-run must match them), prompts.jsonl, prompts.parquet/
(long format, one part per chunk; pyarrow), neurons/ and neurons.parquet (with neurons:K: every neuron's term,
and the aggregated neurons' terms in long format), errors.jsonl, summary.json, *.png (--plot).
A chunk is committed by appending its lines to prompts.jsonl in one write, after its side files are in place
(each written whole, then renamed); a re-run skips the committed chunks and drops a torn last write.

    rows.py     the data (+ data/: the shipped data sets capitals and additions) and its parsing
    compute.py  one chunk: packed pass, prisms at every level, --validate's interventions
    driver.py   sweep(): the chunks, locally or on Ray, resume, progress
    folder.py   the output folder and its files
    summary.py  means, bootstrap intervals, the aggregated neurons, validate's columns
    ray.py      the Ray backend (actors sharing one copy of the weights)
    plots.py    the sweep's figures

Public: sweep, summarize, read_rows, prepare, Row, BadRow, Levels, Validation, Folder, data_path, DATASETS.
May import: interventions, prisms, model, gemma, errors, files, figures.
"""

from refprism.sweeps.compute import Levels, PromptResult, Terms, Validation, compute_chunk
from refprism.sweeps.driver import sweep
from refprism.sweeps.folder import FORMAT, NEURON_COLUMNS, PARQUET_COLUMNS, Folder, read_neurons, read_prompts
from refprism.sweeps.rows import DATASETS, FIELDS, BadRow, Item, Row, data_path, prepare, read_rows
from refprism.sweeps.summary import mean_interval_sign, summarize, validation_summary

__all__ = ["DATASETS", "FIELDS", "FORMAT", "NEURON_COLUMNS", "PARQUET_COLUMNS", "BadRow", "Folder", "Item", "Levels",
           "PromptResult", "Row", "Terms", "Validation", "compute_chunk", "data_path", "mean_interval_sign",
           "prepare", "read_neurons", "read_prompts", "read_rows", "summarize", "sweep", "validation_summary"]
