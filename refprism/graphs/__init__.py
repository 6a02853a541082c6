"""Attribution graphs: every chain of direct effects behind a prediction at once, exact in the neuron basis and in
a transcoder basis (its error and bias nodes make the rows exact).

    build.py        graph(): nodes (neurons or transcoder features, remainders, errors, biases, embeddings, logits)
                    and their exact edges, from batched frozen backward passes (gradients.backward);
                    influence-ordered exploration; edge_heads (per-head splits, both bases)
    transcoders.py  read_transcoders(): GemmaScope, circuit-tracer and SAE Lens transcoder files, every shape checked
    gemma4.py       Gemma 4's nodes: dense neurons of each layer's width, experts' neurons, per-layer-input neurons
                    and PLE token nodes (the slots build's context hands Gemma 4 to; faithfulness' ablation edit)
    prune.py        circuit-tracer's pruning (node 0.8, edge 0.98) and its replacement / completeness scores, on
                    sparse rows with partial selection
    check.py        faithfulness(): the pruned graph's neurons (features) kept, the rest ablated (interventions' rerun)
    export.py       the Neuronpedia / circuit-tracer graph JSON
    view.py         graph_view(): what `refprism report --graph` embeds (nodes, capped edges, every node's exact
                    incoming / outgoing edges and its input split by the prisms' readout)

Public: every name below. May import: gradients, interventions, prisms, model, gemma, errors, files.
"""

from refprism.graphs.build import KINDS, Graph, edge_heads, graph
from refprism.graphs.check import ABLATIONS, faithfulness
from refprism.graphs.export import graph_json, write_graph_json
from refprism.graphs.prune import Pruned, influence, normalize, prune, scores, threshold
from refprism.graphs.transcoders import Transcoder, Transcoders, read_transcoders
from refprism.graphs.view import graph_view, node_split

__all__ = ["ABLATIONS", "KINDS", "Graph", "Pruned", "Transcoder", "Transcoders", "edge_heads", "faithfulness", "graph",
           "graph_json", "graph_view", "influence", "node_split", "normalize", "prune", "read_transcoders", "scores",
           "threshold", "write_graph_json"]
