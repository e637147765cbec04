"""Checkpoints and run configs written before methods (``conf/method/``) and encoders (``conf/encoder/``) were config
groups, mapped onto today's layout so that they load and resume.

Then, ``agent`` (``pieg`` | ``drqv2``) chose the encoder and named the run, and ``encoder`` held the ResNet's
settings whichever encoder ran (``{arch, layer, bn, weights, head_dim}``, once ``shift_pad`` too). Now ``method``
names the preset (``pieg`` | ``drqv2`` | ``svea``), ``encoder.name`` the encoder (``resnet`` | ``conv``), and the
settings an encoder does not take are null. ``agent=pieg`` was ``method=pieg`` with ``encoder.name=resnet``;
``agent=drqv2`` was ``method=drqv2`` with ``encoder.name=conv``.
"""
from __future__ import annotations

import copy
from typing import Any

ENCODER_OF_AGENT = {"pieg": "resnet", "drqv2": "conv"}


def method_and_encoder(method: str | None, agent: str | None, encoder: dict | None) -> tuple[str, dict]:
    """``PIEGModule``'s ``method`` and ``encoder`` from its arguments, old (``agent=``, an encoder without a
    name) or new; the encoder defaults to the method's (``pieg``: resnet, ``drqv2``: conv)."""
    if method is not None and agent is not None and method != agent:
        raise ValueError(f"method={method!r} and agent={agent!r} disagree; agent is the old name of method.")
    method = method or agent or "pieg"
    encoder = dict(encoder or {})
    if not encoder.get("name"):
        if method not in ENCODER_OF_AGENT:
            raise ValueError(f"method={method!r}: name the encoder, e.g. encoder={{'name': 'conv'}}.")
        encoder["name"] = ENCODER_OF_AGENT[method]
    return method, encoder


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config (a checkpoint's sidecar) in today's layout; today's configs come back unchanged."""
    if not config or "method" in config or "agent" not in config:
        return config
    config = copy.deepcopy(config)
    agent = config.pop("agent")
    config["method"] = agent
    encoder = dict(config.get("encoder") or {})
    encoder.pop("shift_pad", None)  # moved to augment.shift_pad
    encoder["name"] = ENCODER_OF_AGENT.get(agent, agent)
    if encoder["name"] == "conv":  # the ResNet's settings were recorded for DrQ-v2 runs too, and unused
        encoder.update(dict.fromkeys(("arch", "layer", "bn", "weights", "head_dim")))
    config["encoder"] = encoder
    return config
