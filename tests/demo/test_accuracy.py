"""Page-by-page comparison of two readers' answers on a task's held-out pages (``accuracy.agreement``)."""

from __future__ import annotations

from qvl_export.demo.accuracy import agreement, exact_match
from qvl_export.demo.tasks import INVOICE


def scripted_reader(replies):
    """A reader that gives ``replies[i]`` (text, stopped) for the i-th page it is shown."""
    it = iter(replies)

    def read(image, prompt):
        return next(it)
    return read


def test_agreement_counts_changed_broken_and_fixed_pages():
    n = 6
    truth = [answer for _, _, answer in INVOICE.heldout_set(n, INVOICE.heldout_seed_offset)]
    ref_replies = [(a, True) for a in truth]
    ref_replies[3] = ("x1", True)  # both wrong, differently
    ref_replies[4] = ("x2", True)  # reference wrong, ours right: fixed
    ref_replies[5] = (truth[5], False)  # reference ran out of tokens: wrong; ours right: fixed
    our_replies = [(a, True) for a in truth]
    our_replies[1] = ("y1", True)  # ours wrong, reference right: broke
    our_replies[3] = ("y3", True)
    reference = exact_match(scripted_reader(ref_replies), n)
    ours = exact_match(scripted_reader(our_replies), n)
    assert reference["exact_match"] == 3 / 6 and ours["exact_match"] == 4 / 6
    reference["answers"] = [list(a) for a in reference["answers"]]  # as read back from eval.json
    got = agreement(ours, reference, n)
    assert got["changed_pages"] == [1, 3, 4, 5]
    assert got["answer_agreement"] == 1 - 4 / 6
    assert got["broke"] == [1] and got["fixed"] == [4, 5]
    assert agreement(ours, reference, 4)["changed_pages"] == [1, 3]  # fewer pages: the first ones
    assert agreement(ours, {"answers": reference["answers"][:3]}, 4) is None  # not enough recorded
    assert agreement(ours, {}, n) is None
