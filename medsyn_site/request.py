"""The request contract (central -> site, for targeted synthesis): which masks, how many samples of
each, and how they may be used. The central evaluator writes it (``medsyn evaluate select-targeted``);
the site samples from it (``medsyn sample --masks request:FILE``) and publishes the result through
``medsyn publish``. Only case ids cross the boundary: the site finds them in a cohort it holds.

  cases      ids of cases whose masks condition the samples (real ids the site holds)
  per_mask   volumes per mask
  mask_mode  relocated (default: each mask's nodules flipped and moved inside the lungs) or verbatim
             (the masks as they are; `medsyn publish` then needs --allow-verbatim-masks)
  cohort     optional, for the record only: the site never follows it (it names its own folder with
             --request-cohort; a request must not choose which of a site's folders is read)
  reason     why these cases (for the record)
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsyn_site.atomic import atomic_write_text, read_json
from medsyn_site.errors import MedsynError

FORMAT = "medsyn-sample-request"
MODES = ("relocated", "verbatim")


class RequestError(MedsynError):
    """A request file that cannot be used; the message names the file and the problem."""


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["medsyn-sample-request"] = FORMAT
    version: int = 1
    cases: list[str] = Field(min_length=1)
    per_mask: int = Field(1, ge=1)
    mask_mode: Literal["relocated", "verbatim"] = "relocated"
    cohort: str | None = None
    reason: str = ""


def write(path: str | Path, request: Request) -> Path:
    return atomic_write_text(Path(path), request.model_dump_json(indent=1))


def read(path: str | Path) -> Request:
    doc = read_json(path, RequestError, "request file not found")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RequestError(f"{path}: not a {FORMAT} file")
    try:
        return Request.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        raise RequestError(f"{path}: {'.'.join(map(str, err['loc'])) or 'request'}: {err['msg']}") from e
