"""Pins the response length T and what gets scored: T counts the EOS token, and the EOS token is scored.

docs/method.md §1: T_i is the number of scored tokens "through EOS, or the cut". A sampler that stops counting one token
early (T = index of EOS instead of index + 1) drops the EOS term from S_i, from Σ_t H_{i,t} and from λ_i = T_i;
every estimator stays self-consistent, so no statistical test notices. These tests drive the real sampling
loop (probe_dist.rollout.generate.sample_responses) with a scripted stub policy whose logits put all mass on a
chosen token at each step (1e4 against 0: every other probability underflows to exactly 0, so the draw is
deterministic), then check the Group teacher-forcing layout and the real scoring forward
(probe_dist.model.policy.PolicyModel.forward, around a table-driven stub LM) on the result:

* lengths T == position of EOS + 1; responses hold EOS at T − 1 and pad after it; a response cut by
  max_new_tokens has T == max_new_tokens;
* the layout's response_mask marks exactly T positions per row, the last one being the EOS position, and
  input_ids hold EOS there;
* the scoring forward returns exactly Σ T values, the last of each row being log π(EOS | prefix).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from probe_dist.model.policy import PolicyModel
from probe_dist.rollout.batch import Group
from probe_dist.rollout.generate import sample_responses
from tests.test_chunked import lh_error_bound

V = 8
EOS = 7
PAD = 0
TOK = 3
PROMPT = torch.tensor([5, 1, 4, 6])
P = PROMPT.numel()
SEED_KEY = (0, "E", 0)
CPU = torch.device("cpu")


class ScriptedPolicy:
    """decode() puts all mass on scripts[row][step] (TOK once the script is exhausted). Records every call."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts = scripts
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def decode(self, input_ids, past_key_values=None, position_ids=None, attention_mask=None):
        step = 0 if past_key_values is None else past_key_values
        assert input_ids.shape[0] == len(self.scripts)
        self.calls.append((input_ids.clone(), position_ids.clone()))
        logits = torch.zeros(input_ids.shape[0], V, dtype=torch.float32)
        for row, script in enumerate(self.scripts):
            logits[row, script[step] if step < len(script) else TOK] = 1e4
        return logits, step + 1


def sample(scripts: list[list[int]], max_new_tokens: int, pad_id: int = PAD, lockstep: bool = False,
           policy: ScriptedPolicy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    policy = policy or ScriptedPolicy(scripts)
    return sample_responses(policy, PROMPT, len(scripts), max_new_tokens=max_new_tokens, temperature=1.0,
                            eos_ids=[EOS], pad_id=pad_id, seed_key=SEED_KEY, device=CPU, lockstep=lockstep)


def make_group(responses: torch.Tensor, lengths: torch.Tensor) -> Group:
    return Group(prompt_index=0, prompt_ids=PROMPT, responses=responses, lengths=lengths,
                 rewards=torch.zeros(responses.shape[0], dtype=torch.float64))


def test_eos_is_counted_in_length() -> None:
    policy = ScriptedPolicy([[TOK, TOK, EOS]] * 2)
    responses, lengths = sample([[TOK, TOK, EOS]] * 2, max_new_tokens=6, policy=policy)
    assert responses.shape == (2, 6)
    assert lengths.tolist() == [3, 3]
    assert responses[:, :2].eq(TOK).all()
    assert responses[:, 2].eq(EOS).all()
    assert responses[:, 3:].eq(PAD).all()
    # Stops once every row is done; each step feeds back the previous token at the next absolute position.
    assert len(policy.calls) == 3
    ids0, pos0 = policy.calls[0]
    assert torch.equal(ids0, PROMPT.expand(2, -1))
    assert torch.equal(pos0, torch.arange(P).expand(2, -1))
    for t in (1, 2):
        ids, pos = policy.calls[t]
        assert torch.equal(ids, responses[:, t - 1:t])
        assert pos.tolist() == [[P + t - 1]] * 2


def test_layout_scores_the_eos_position() -> None:
    responses, lengths = sample([[TOK, TOK, EOS]] * 2, max_new_tokens=6)
    layout = make_group(responses, lengths).layout(slice(0, 2))
    mask = layout.response_mask
    assert layout.response_start == P
    assert mask.shape == (2, 3)  # width = max T
    assert mask.sum(1).tolist() == [3, 3]
    assert mask.all()  # includes column T − 1 = 2, the EOS
    assert layout.input_ids[:, P + 2].eq(EOS).all()
    assert layout.input_ids[:, P:P + 2].eq(TOK).all()
    assert torch.equal(layout.attention_mask, torch.ones(2, P + 3, dtype=torch.long))


def test_eos_at_first_step_gives_length_one() -> None:
    responses, lengths = sample([[EOS]], max_new_tokens=4)
    assert lengths.tolist() == [1]
    assert responses.tolist() == [[EOS, PAD, PAD, PAD]]
    layout = make_group(responses, lengths).layout(slice(0, 1))
    assert layout.response_mask.tolist() == [[True]]
    assert int(layout.input_ids[0, P]) == EOS


def test_cut_before_eos_gives_max_new_tokens() -> None:
    responses, lengths = sample([[TOK, TOK, TOK, TOK, EOS]], max_new_tokens=3)
    assert lengths.tolist() == [3]
    assert responses.tolist() == [[TOK, TOK, TOK]]
    layout = make_group(responses, lengths).layout(slice(0, 1))
    assert layout.response_mask.tolist() == [[True, True, True]]


SCRIPTS = [[TOK, EOS], [TOK, TOK, TOK, EOS], [EOS], [TOK] * 8, [TOK, TOK, TOK, TOK, EOS]]
EXPECTED_T = [2, 4, 1, 5, 5]  # row 3 is cut at max_new_tokens = 5; row 4 ends with EOS exactly at the cut


@pytest.mark.parametrize("lockstep", [False, True])
def test_rows_finishing_at_different_steps(lockstep: bool) -> None:
    responses, lengths = sample(SCRIPTS, max_new_tokens=5, lockstep=lockstep)
    assert lengths.tolist() == EXPECTED_T
    for row, (script, t_len) in enumerate(zip(SCRIPTS, EXPECTED_T)):
        assert responses[row, :t_len].tolist() == script[:t_len]
        assert responses[row, t_len:].eq(PAD).all()  # finished rows get pad even though the stub says TOK
    group = make_group(responses, lengths)
    for rows in (2, 5):  # every chunk has the group-wide width max T
        for layout in group.microbatches(rows):
            mask = layout.response_mask
            assert mask.shape[1] == max(EXPECTED_T)
            for i, row in enumerate(range(layout.rows.start, layout.rows.stop)):
                t_len = EXPECTED_T[row]
                assert mask[i].tolist() == [c < t_len for c in range(mask.shape[1])]
                last = int(layout.input_ids[i, P + t_len - 1])
                assert last == (EOS if EOS in SCRIPTS[row][:t_len] else TOK)


def test_lockstep_runs_every_step_and_keeps_padding() -> None:
    policy = ScriptedPolicy([[TOK, EOS]] * 3)
    responses, lengths = sample([[TOK, EOS]] * 3, max_new_tokens=5, lockstep=True, policy=policy)
    assert len(policy.calls) == 5
    assert lengths.tolist() == [2, 2, 2]
    assert responses.tolist() == [[TOK, EOS, PAD, PAD, PAD]] * 3


def test_pad_equal_to_eos_counts_only_the_first_eos() -> None:
    responses, lengths = sample([[TOK, EOS, EOS, EOS]], max_new_tokens=4, pad_id=EOS)
    assert lengths.tolist() == [2]
    assert responses.tolist() == [[TOK, EOS, EOS, EOS]]
    assert make_group(responses, lengths).layout(slice(0, 1)).response_mask.tolist() == [[True, True]]


# ---------------------------------------------------------------------------------------------- scoring forward
class _TableDecoder(nn.Module):
    """last_hidden_state[row, j] = table[row, position_ids[row, j]] (hidden size V; the head is the identity)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        rows = torch.arange(input_ids.shape[0]).unsqueeze(1)
        return SimpleNamespace(last_hidden_state=self.table[rows, position_ids])


class TableLM(nn.Module):
    """The two hooks PolicyModel needs from a causal LM: get_decoder() and get_output_embeddings()."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.decoder = _TableDecoder(table)
        self.head = nn.Identity()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_scoring_forward_scores_t_tokens_including_eos() -> None:
    responses, lengths = sample(SCRIPTS, max_new_tokens=5)
    group = make_group(responses, lengths)
    layout = group.layout(slice(0, group.size))
    width = layout.response_mask.shape[1]
    table = torch.randn(group.size, P + width, V, generator=torch.Generator().manual_seed(0))
    policy = PolicyModel(TableLM(table))
    logp, ent = policy(layout.input_ids, layout.attention_mask, layout.response_start,
                       layout.response_mask, temperature=1.0)
    assert logp.shape == ent.shape == (sum(EXPECTED_T),)
    # tol: fp the scorer's float32 ℓ, H of exact (float32-valued) logits at τ = 1 against float64 here: the
    # first-order model of tests/test_chunked.lh_error_bound over V = 8 terms (~1e-5 at these logits); a wrong
    # position (the off-by-one this test is about) or target moves ℓ by O(1)
    tol = lh_error_bound(table.double(), 0.0, torch.float32)
    k = 0
    for row, t_len in enumerate(EXPECTED_T):
        for t in range(t_len):
            z = table[row, P + t - 1].tolist()  # the position before token t predicts it
            lse = math.log(sum(math.exp(v) for v in z))
            y = int(responses[row, t])
            bound = float(tol[row, P + t - 1])
            assert float(logp[k]) == pytest.approx(z[y] - lse, rel=0, abs=bound)  # tol: fp (above)
            h = lse - sum(math.exp(v - lse) * v for v in z)
            assert float(ent[k]) == pytest.approx(h, rel=0, abs=bound)  # tol: fp (above)
            k += 1
        # The row's last scored value is the EOS term (for rows that ended with EOS).
        if EOS in SCRIPTS[row][:t_len]:
            z = table[row, P + t_len - 2].tolist()
            bound = float(tol[row, P + t_len - 2])  # tol: fp (above)
            assert float(logp[k - 1]) == pytest.approx(z[EOS] - math.log(sum(math.exp(v) for v in z)), abs=bound)


def test_every_eos_id_ends_a_response():
    """Several EOS ids (generation_config.eos_token_id as a list): each one ends its row, is counted and scored."""
    other_eos = 6
    scripts = [[TOK, other_eos], [TOK, TOK, EOS], [other_eos], [TOK, TOK, TOK, TOK]]
    policy = ScriptedPolicy(scripts)
    responses, lengths = sample_responses(policy, PROMPT, len(scripts), max_new_tokens=4, temperature=1.0,
                                          eos_ids=[EOS, other_eos], pad_id=PAD, seed_key=SEED_KEY, device=CPU)
    assert lengths.tolist() == [2, 3, 1, 4]
    for row, t in enumerate(lengths.tolist()):
        if row < 3:  # the row ended at one of the EOS ids, which is its last scored token
            assert int(responses[row, t - 1]) in (EOS, other_eos)
        assert (responses[row, t:] == PAD).all()  # nothing after an EOS is kept, so nothing after it is scored
    mb = Group(0, PROMPT, responses, lengths, torch.zeros(4, dtype=torch.float64)).layout(slice(0, 4))
    assert mb.response_mask.sum(1).tolist() == lengths.tolist()


def test_response_eos_ids_union_of_tokenizer_and_generation_config():
    from probe_dist.rollout.sample import response_eos_ids

    tok = SimpleNamespace(eos_token_id=7)
    assert response_eos_ids(tok, SimpleNamespace(eos_token_id=[1, 16])) == [1, 7, 16]
    assert response_eos_ids(tok, SimpleNamespace(eos_token_id=7)) == [7]
    assert response_eos_ids(tok, None) == [7]
    with pytest.raises(ValueError, match="EOS"):
        response_eos_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=None))


def test_decode_response_stops_at_any_eos():
    from probe_dist.data.rewards import decode_response

    class Tok:
        eos_token_id = 7

        def decode(self, ids, skip_special_tokens=False):
            return "".join(str(i) for i in ids)

    assert decode_response(Tok(), [1, 2, 6, 3], eos_ids=[7, 6]) == "12"
    assert decode_response(Tok(), [1, 2, 7, 3]) == "12"


def test_inverse_cdf_sampling_draws_the_distribution():
    """Counter-based inverse-CDF draws follow softmax(z) (chi-square over 40k rows), never pick a zero-probability
    id, and are a pure function of (key, step): the same row alone or in a batch draws the same token."""
    from scipy import stats

    from probe_dist.rollout.generate import inverse_cdf_sample

    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0, 0.0], dtype=torch.float32)
    keys = torch.arange(40000, dtype=torch.int64) * 2654435761 % (1 << 62)
    for step in (0, 5):
        tokens = inverse_cdf_sample(probs.expand(keys.numel(), -1), keys, step)
        counts = torch.bincount(tokens, minlength=V).double()
        assert float(counts[probs == 0].sum()) == 0.0
        support = probs > 0
        expected = probs[support].double() * keys.numel()
        chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
        assert chi2 < stats.chi2.isf(1e-4, int(support.sum()) - 1), chi2
        alone = inverse_cdf_sample(probs.unsqueeze(0), keys[123:124], step)
        assert int(alone[0]) == int(tokens[123])
    with pytest.raises(RuntimeError, match="invalid sampling distribution"):
        inverse_cdf_sample(torch.full((1, V), float("nan")), keys[:1], 0)
