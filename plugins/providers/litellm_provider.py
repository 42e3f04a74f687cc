"""The default model provider: any model litellm speaks to (OpenAI, Anthropic, Gemini, vLLM ...)."""

from __future__ import annotations

import os
from typing import Any

from vkr_core.calls import PermanentError, Provider, ProviderReply, TransientError
from vkr_core.config import ModelSpec
from vkr_core.hookspecs import hookimpl
from vkr_core.log import redact, register_secrets

_litellm: Any = None


def _import_litellm() -> Any:
    """Import litellm on first use: it is slow to import and fetches a cost map unless told not to."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        if os.environ.get("LITELLM_LOG") == "":
            del os.environ["LITELLM_LOG"]  # an empty value makes the import fail
        import litellm

        litellm.drop_params = True  # a provider without `seed` support must not fail the call
        litellm.suppress_debug_info = True
        litellm.redact_messages_in_exceptions = True
        litellm.turn_off_message_logging = True
        litellm.telemetry = False
        _litellm = litellm
    return _litellm


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LitellmProvider(Provider):
    name = "litellm"

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> ProviderReply:
        litellm = _import_litellm()
        api_key = spec.api_key()
        register_secrets([api_key])
        if api_key is None and spec.api_base:
            # Local OpenAI-compatible servers (vLLM, the fake server) need no key, but the
            # OpenAI client refuses to send a request without one: vLLM's convention.
            api_key = "EMPTY"
        try:
            response = await litellm.acompletion(
                model=spec.model,
                messages=messages,
                api_base=spec.api_base,
                api_key=api_key,
                timeout=spec.timeout,
                extra_headers=headers,
                # tenacity in vkr_core.calls owns retries; litellm's and the SDK's would
                # multiply attempts and hide 429s from the adaptive limiter.
                num_retries=0,
                max_retries=0,
                **params,
            )
        except (
            litellm.RateLimitError,
            litellm.Timeout,
            litellm.APIConnectionError,
            litellm.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
        ) as exc:
            status = getattr(exc, "status_code", None)
            raise TransientError(
                f"{type(exc).__name__}: {redact(str(exc))[:300]}", _retry_after(exc), status
            ) from None
        except litellm.ContentPolicyViolationError as exc:
            return ProviderReply(
                text=redact(str(exc))[:500], finish_reason="content_filter", refusal=True
            )
        except Exception as exc:  # 4xx and everything else: retrying cannot help
            raise PermanentError(f"{type(exc).__name__}: {redact(str(exc))[:300]}") from None

        choice = response.choices[0]
        message = choice.message
        text = message.content or ""
        refusal_text = getattr(message, "refusal", None)
        finish = choice.finish_reason
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = None
        if spec.input_cost_per_token is None and spec.output_cost_per_token is None:
            try:
                cost = float(litellm.completion_cost(completion_response=response))
            except Exception:
                cost = 0.0  # a model missing from litellm's price map
        return ProviderReply(
            text=text or (refusal_text or ""),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            refusal=finish == "content_filter" or bool(refusal_text),
        )


@hookimpl
def vkr_register_providers(register: Any) -> None:
    register(LitellmProvider())
