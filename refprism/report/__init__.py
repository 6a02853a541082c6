"""`refprism report`: one self-contained HTML page to explore a prompt's prisms by clicking.

The page is one file: the script (refprism/report/assets/report.js), the style (report.css) and the data are
inlined, so it opens offline in any browser with no server and fetches nothing. Every number it shows is one of
refprism's own, embedded as JSON in the prisms' one schema (Split.to_json), encoded compactly but losslessly
(`encode_split` / `decode_split`).

What is embedded. A *node* is a readout: the logits (the root, path []) or a readout pulled back through a head at a
source token or through a neuron (path ["L12H2.src5", ...], as `prisms.through_head` / `through_neuron` make). Each
embedded node carries its residual prism (the root's `residual`, a pulled-back node's `chain`: the term split into
the residual parts at its site). A node is *opened* when its attention and MLP prisms are embedded too:

    depth 0, the root        opened: every layer's attention prism (every head x source) and MLP prism (its `top`
                             neurons by max |term| over the columns, the rest summed in one `omitted` row).
    depth 1                  the chain of every root head x source cell whose attention weight is nonzero (a zero
                             weight makes the term and its chain exactly 0), and of the top `branch` neurons of each
                             root MLP panel. Opened (when depth >= 2): the top `branch` children of each root panel.
    depth d, 2 <= d <= depth an opened node at depth d-1 embeds the attention / MLP prisms of its `branch` largest
                             layer parts (L{j}.attn, L{j}.mlp), and the chains of the top `branch` cells / neurons of
                             each; those are opened in turn while d < depth.

"Largest" is always Split.top's order: max |value| over the columns. So the page holds, with L layers, N heads, T
tokens, Z columns and b = branch: L*N*T + L*b chains at depth 1 (O(L^2 N T Z) numbers), and at most 2*L*b^(2d-1)
chains at each depth d >= 2; each stored number takes 16/3 bytes (float32, base64) plus ~250 bytes of JSON keys per
split. For gemma-2b at "The capital city of France is" (T = 7, the top 5 targets) with the defaults: 1,320 chains,
1.48 MB. Whatever was not precomputed the page says so, with the `refprism chain` command that computes it.

Optional sections embed, as given, the JSON of `refprism validate` (interventions), `refprism compare`, a
sweep's summary.json and an attribution graph's view (graphs.graph_view: the pruned graph, every shown node's exact
incoming and outgoing edges and its input split by the prisms' readout, all computed in Python), after checking the
keys the renderers read (`check_section`; a graph also against the page's model, prompt and position:
`check_graph`). The page draws the graph (x = token position, y = layer) and opens a node's numbers on a click.

    page.py   build_data (what the page embeds), render, build_page, write_report, the optional sections
    assets/   report.html, report.js, report.css (inlined at build time)

Public: write_report, build_page, build_data, page_data, encode_split, decode_split, check_section, check_graph,
load_section.
May import: prisms, model, gemma, errors, files (sections from other capabilities arrive as their JSON).
"""

from refprism.report.page import (
                                  FORMAT,
                                  GRAPH_FORMAT,
                                  NEXT_TOKENS,
                                  SECTION_KEYS,
                                  build_data,
                                  build_page,
                                  check_budget,
                                  check_graph,
                                  check_section,
                                  decode_split,
                                  encode_split,
                                  load_section,
                                  node_key,
                                  page_data,
                                  pull_back,
                                  render,
                                  write_report,
)

__all__ = ["FORMAT", "GRAPH_FORMAT", "NEXT_TOKENS", "SECTION_KEYS", "build_data", "build_page", "check_budget",
           "check_graph", "check_section", "decode_split", "encode_split", "load_section", "node_key", "page_data",
           "pull_back", "render", "write_report"]
