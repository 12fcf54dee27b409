"""``POST /choose``: which of two candidates the caller kept, the evidence a DPO retraining learns from.

A request with ``"candidates": 2`` on ``/txt2img_json`` (or ``/jobs``) draws two images of one prompt at seeds
``seed`` and ``seed+1``; both are logged as any generation is and recorded as one pair (``pair_id`` in the answer,
``monitor/store_pairs.py``). The caller then posts ``{"pair_id": ..., "chosen": <generation_id of the one kept>}``.

Why a separate endpoint and not a field on ``/feedback``: a rating judges one image, a choice ranks two; keeping
them apart keeps each one's rules and rows simple (a rating never silently becomes a choice), while the identity
rules are exactly ``/feedback``'s (the guard checks the body and the key's ``feedback`` or ``rater`` scope and its
rate limit): a key chooses only on pairs it made unless it holds ``rater`` (403); an unknown pair is 404; a chosen
id outside the pair is 400; one choice per rater and pair (the client id, else the key's name, else
``anonymous``), a repeat replacing it, and 409 when that row was written under another key.
"""

from __future__ import annotations

from typing import Any

from bento.auth import key_of
from bento.handlers import error, store_outage, unavailable
from bento.schemas import ChooseRequest, ChooseResponse


def choose(store: Any, params: dict[str, Any], request: Any) -> Any:
    """Store (or replace) a client's choice between the two candidates of a pair; see the module docstring."""
    from monitor.store import ChoiceOfAnotherKey, NotInPair, UnknownPair

    body = ChooseRequest.model_construct(**params)
    key = key_of(request)
    client = body.client_id or request.headers.get("x-client-id") or (key.name if key else "anonymous")
    try:
        pair = store.get_pair(body.pair_id)
        if pair is None:
            raise UnknownPair(body.pair_id)
        if key is not None and not store.may_choose(key, pair):
            return error(403, "forbidden", f"key {key.name!r} may choose only on the pairs it made (the 'rater' "
                                           "scope chooses on any)", "choose")
        row = store.add_choice(body.pair_id, body.chosen, client, api_key_id=key.id if key else None)
    except UnknownPair:
        return error(404, "not_found", f"pair_id {body.pair_id!r} is unknown: use the pair_id a txt2img_json "
                                       "answer with \"candidates\": 2 returned", "choose")
    except NotInPair as e:
        return error(400, "invalid", str(e), "choose")
    except ChoiceOfAnotherKey as e:
        return error(409, "conflict", str(e), "choose")
    except Exception as e:  # noqa: BLE001
        if store_outage(e):
            return unavailable(e, "choose")
        raise
    return ChooseResponse(status="stored", choice_id=row["id"], pair_id=row["pair_id"], chosen=row["chosen"],
                          rejected=row["rejected"], updated=row["updated_existing"])
