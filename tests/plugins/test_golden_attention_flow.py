"""Attention rollout and attention flow against the official code (``samiraabnar/attention_flow``,
``attention_graph_util.py``): ``tests/golden/attention_rollout_flow.npz`` holds seeded attentions
``(4 blocks, 3 heads, 7 tokens, 7 tokens)``, the official ``compute_joint_attention`` of their head
mean and the official ``compute_node_flow`` of the last block's token 0 (see PROVENANCE.md)."""

import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "attention_rollout_flow.npz"


def _golden():
    with np.load(GOLDEN) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"][0]))
    assert meta["commit"] and meta["repository"].endswith("samiraabnar/attention_flow")
    return data


def _a_hats(att):
    from explorer_plugins.common.attention import fuse_heads, residual_augment

    return [residual_augment(fuse_heads(a, "mean")) for a in att]


def test_rollout_equals_the_official_joint_attention():
    from explorer_plugins.attention_rollout.method import rollout
    from explorer_plugins.common.attention import rollout_row

    g = _golden()
    joint = rollout(list(g["attentions"]), "mean", 0.0)
    np.testing.assert_allclose(joint, g["joint"][-1], rtol=0, atol=1e-12)
    for q in range(joint.shape[0]):  # the row-only chain the plugin runs
        np.testing.assert_allclose(rollout_row(_a_hats(g["attentions"]), q), g["joint"][-1][q], rtol=0, atol=1e-12)


def test_flow_equals_the_official_node_flow():
    from explorer_plugins.attention_flow.method import node_flows

    g = _golden()
    flows = node_flows(_a_hats(g["attentions"]), 0)
    np.testing.assert_allclose(flows, g["flow_row"], rtol=0, atol=1e-7)  # capacities quantised to 2**-28
