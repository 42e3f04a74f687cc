"""The built-in exporters, registered exactly as a third-party plugin registers its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plugins.exporters.evaluation import EvalExporter
from plugins.exporters.huggingface import HuggingFaceExporter
from plugins.exporters.llamafactory import LlamaFactoryExporter
from plugins.exporters.verl import VerlExporter
from plugins.exporters.videokr import VideoKRExporter
from vkr_core.hookspecs import hookimpl


@hookimpl
def vkr_register_exporters(register: Callable[[Any], None]) -> None:
    for exporter in (
        VideoKRExporter(),
        LlamaFactoryExporter(),
        VerlExporter(),
        HuggingFaceExporter(),
        EvalExporter(),
    ):
        register(exporter)
