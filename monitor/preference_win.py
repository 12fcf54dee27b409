"""The preference win rate of the challenger against the champion, as the pixel checker sees it.

The retraining's comparison draws both models on the same held-out prompts and seeds (``compare_runs``). Where the
prompts are in the synthetic-shapes caption grammar (``finetune.evaluation.shapecheck``: colour, shape, size,
position, background), the checker plays a rater who asked for that prompt and compares the two images of each
(prompt, seed): the one that shows more of what the caption names wins, equal is a tie. The win rate is the
challenger's wins among the decided pairs, with a 95% Wilson interval and a two-sided sign test, the same numbers
``sdloop review summary`` gives for people. It is recorded in the retraining log's compare step and shown with the
comparison; it does not decide the gate (KID and validation loss do), because the checker reads only prompts of its
grammar: it is the preference objective's own measure, reported where it applies and said to be absent elsewhere.
"""

from __future__ import annotations

from typing import Any, Optional


def caption_win_rate(comparison: dict[str, Any]) -> dict[str, Any]:
    """{"applies", "wins", "losses", "ties", "win_rate", "interval", "p_value", "judged", "text"} from a comparison's
    data (eval.json of ``compare_runs``: champion ``a``, challenger ``b``)."""
    from PIL import Image

    from finetune.evaluation.metrics import sign_test, wilson
    from finetune.evaluation.shapecheck import ATTRIBUTES, parse_caption, read_attributes

    labels = list(comparison["models"])
    champion, challenger = labels[0], labels[1]
    prompts = comparison["generation"]["prompts"]
    by_key = {lab: {(g["prompt_index"], g["seed"]): g["file"] for g in comparison["images"][lab]} for lab in labels}
    wins = losses = ties = judged = 0
    for key, file_a in by_key[champion].items():
        file_b = by_key[challenger].get(key)
        named = parse_caption(prompts[key[0]] or "")
        if not named or file_b is None:
            continue
        judged += 1
        score = []
        for f in (file_a, file_b):
            with Image.open(f) as im:
                read = read_attributes(im)
            score.append(sum(read[a] == named[a] for a in ATTRIBUTES))
        wins += score[1] > score[0]
        losses += score[1] < score[0]
        ties += score[1] == score[0]
    if not judged:
        return {"applies": False, "judged": 0, "wins": 0, "losses": 0, "ties": 0, "win_rate": None,
                "interval": [None, None], "p_value": None,
                "text": "preference win rate: not measured (no comparison prompt is in the pixel checker's caption "
                        "grammar; use the blind review page, `sdloop review`, for people's preference)"}
    decided = wins + losses
    rate: Optional[float] = wins / decided if decided else None
    low, high = wilson(wins, decided)
    p = sign_test(wins, losses) if decided else None
    text = (f"preference win rate (pixel checker, {judged} prompt/seed pairs): challenger won {wins}, lost {losses}, "
            f"tied {ties}" + (f"; {rate:.2f} of the decided (95% interval {low:.2f}-{high:.2f}, sign test p = "
                              f"{p:.3g})" if rate is not None else "; none decided"))
    return {"applies": True, "judged": judged, "wins": wins, "losses": losses, "ties": ties, "win_rate": rate,
            "interval": [low, high], "p_value": p, "text": text}
