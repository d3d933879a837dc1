"""Language-model packages (task text-generation, runtime ``openvino-genai``): OpenVINO GenAI's
continuous-batching pipeline with a paged KV cache, driven by :class:`edgeopt.agent.textgen.TextEngine`.

The package holds the stateful OpenVINO IR (``openvino_model.xml``), the tokenizer and detokenizer as
OpenVINO models (openvino-tokenizers) and the chat template: the device needs OpenVINO GenAI and nothing from
PyTorch or transformers. The pipeline's KV cache precision and compute precision are the package's
``runtime_options`` (what the SDK validated with); the KV cache budget is the profile's ``[llm] kv_cache_gb``
unless the agent's ``[text_generation]`` says otherwise.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import AccuracyError, InputError, MissingDependencyError, UnsupportedError
from ...sdk.package import TensorSpec
from .base import LoadedModel, Runtime

log = logging.getLogger(__name__)

MAX_MESSAGES = 1024  # chat messages in one request
ROLES = ("system", "user", "assistant", "developer", "tool")


def _genai():
    try:
        import openvino_genai
    except ImportError:
        raise MissingDependencyError(
            "runtime openvino-genai needs OpenVINO GenAI on the device",
            hint="pip install 'edgeopt[agent-llm]' (openvino-genai and openvino-tokenizers), then restart the "
                 "agent") from None
    return openvino_genai


class TextGenerationModel(LoadedModel):
    """A loaded language model: prompts in, text out, through the engine thread (see the module docstring).

    It has no tensor inputs: ``infer`` refuses, and the API's text endpoints use :meth:`prompt_ids` and
    :meth:`start` instead."""

    task = "text-generation"

    def __init__(self, pipe: Any, tokenizer: Any, *, name: str, context_length: int, eos_token_id: int | None,
                 serving: dict[str, Any], device: str, version: str):
        from ..metrics import TextMetrics
        from ..textgen import TextEngine

        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.pipe, self.tokenizer = pipe, tokenizer
        self.name = name
        self.context_length = int(context_length) or 2048
        self.eos_token_id = eos_token_id
        self.serving = serving
        self.device, self.version = device, version
        self.default_max_tokens = int(serving.get("default_max_tokens", 256))
        self.max_prompt_chars = int(serving.get("max_prompt_chars", 1_000_000))
        self.text_metrics = TextMetrics()
        self.engine = TextEngine(pipe, self._config, self.decode, name, max_running=int(serving.get("max_running", 8)),
                                 max_queue=int(serving.get("max_queue", 64)), metrics=self.text_metrics,
                                 make_prompt=self._tensor, decode_many=self.decode_many)
        self.text_metrics.engine = self.engine

    # ------------------------------------------------------------------ prompts
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_many(self, seqs: list[list[int]]) -> list[str]:
        return list(self.tokenizer.decode(seqs, skip_special_tokens=True)) if len(seqs) > 1 else [self.decode(seqs[0])]

    @staticmethod
    def _tensor(ids: list[int]):
        import openvino as ov

        return ov.Tensor(np.asarray(ids, dtype=np.int64)[None, :])

    def _encode(self, text: str, special: bool) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=special).input_ids.data[0]]

    def chat_ids(self, messages: Any) -> list[int]:
        """Token ids of a chat (OpenAI ``messages``) through the package's chat template."""
        if not isinstance(messages, list) or not messages:
            raise InputError("'messages' must be a non-empty list of {role, content} objects")
        if len(messages) > MAX_MESSAGES:
            raise InputError(f"{len(messages)} messages: at most {MAX_MESSAGES} in one request")
        history, chars = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InputError(f"messages[{i}] needs a role of {', '.join(ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise InputError(f"messages[{i}].content: only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise InputError(f"messages[{i}].content must be a string")
            chars += len(content)
            if chars > self.max_prompt_chars:
                raise InputError(f"the messages are over {self.max_prompt_chars} characters")
            history.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        try:
            text = self.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template refused this history (e.g. roles out of order)
            raise InputError(f"the model's chat template refused the messages: {' '.join(str(exc).split())[:200]}") \
                from None
        return self._encode(text, special=False)

    def prompt_ids(self, prompt: Any) -> list[int]:
        """Token ids of a plain completion prompt (a string, or a list of one string)."""
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InputError("'prompt' must be a string (one prompt per request)")
        if len(prompt) > self.max_prompt_chars:
            raise InputError(f"the prompt is over {self.max_prompt_chars} characters")
        if not prompt:
            raise InputError("'prompt' is empty")
        return self._encode(prompt, special=True)

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """The tokens to generate; InputError when the prompt (and the asked tokens) do not fit the context."""
        room = self.context_length - n_prompt
        if room <= 0:
            raise InputError(f"the prompt is {n_prompt} tokens; this model's context is {self.context_length} "
                             f"tokens: shorten it")
        if max_tokens is None:
            return min(self.default_max_tokens, room)
        if max_tokens > room:
            raise InputError(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is over this model's "
                             f"context of {self.context_length} tokens")
        return max_tokens

    def _config(self, gen) -> Any:
        genai = _genai()
        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = gen.max_tokens
        if self.eos_token_id is not None:
            cfg.eos_token_id = int(self.eos_token_id)
        temperature = gen.sampling.get("temperature")
        if temperature:
            cfg.do_sample = True
            cfg.temperature = float(temperature)
            if gen.sampling.get("top_p") is not None:
                cfg.top_p = float(gen.sampling["top_p"])
            if gen.sampling.get("seed") is not None:
                cfg.rng_seed = int(gen.sampling["seed"]) & 0xFFFFFFFF
        else:
            cfg.do_sample = False
        if gen.stop:
            cfg.stop_strings = set(gen.stop)
        if gen.sampling.get("ignore_eos"):
            cfg.ignore_eos = True
        return cfg

    def start(self, ids: list[int], max_tokens: int | None = None, stop: list[str] | None = None,
              sampling: dict[str, Any] | None = None):
        """Admit one generation (BusyError when the engine is full); returns the :class:`Generation`."""
        from ..textgen import Generation

        return self.engine.admit(Generation(ids, self.budget(len(ids), max_tokens), stop, sampling))

    # ------------------------------------------------------------------ LoadedModel
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise InputError(f"model {self.name!r} generates text: use /v1/chat/completions, /v1/completions or "
                         f"/v2/models/{self.name}/generate")

    def generate(self, ids: list[int], max_tokens: int, timeout: float = 300.0) -> tuple[list[int], str]:
        """Greedy generation through the engine, waiting for the end (warm-up and self-test)."""
        gen = self.start(ids, max_tokens)
        if not gen.wait(timeout):
            gen.cancel()
            raise AccuracyError(f"{self.name}: generation did not finish within {timeout:g} s")
        if gen.finish_reason == "error":
            raise AccuracyError(f"{self.name}: generation failed: {gen.error}")
        return gen.ids, gen.text

    def warm_up(self) -> None:
        self.generate(self.chat_ids([{"role": "user", "content": "Hello"}]), 4)

    def self_test(self, golden: list[dict[str, Any]]) -> dict[str, Any]:
        """Replay the package's golden prompts greedily; each continuation must begin with the expected one's
        first tokens: at least half of them and never fewer than 4 (greedy decoding on another CPU may part
        from the builder's at a near tie late in the text, never at the start of a working model's answer)."""
        if not golden:
            return {"samples": 0, "skipped": "the package has no golden prompts"}
        worst = 1.0
        for i, g in enumerate(golden):
            want = self._encode(str(g["expected"]), special=False)
            ids, text = self.generate(self.chat_ids([{"role": "user", "content": str(g["prompt"])}]),
                                      int(g.get("max_new_tokens", 24)))
            got = self._encode(text, special=False)
            same = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            need = min(len(want), max(4, (len(want) + 1) // 2))
            worst = min(worst, same / max(1, len(want)))
            if same < need:
                raise AccuracyError(
                    f"self-test failed on golden prompt {i} ({str(g['prompt'])[:60]!r}): the answer agrees with the "
                    f"expected one for {same} tokens, {need} needed: got {text[:80]!r}, expected "
                    f"{str(g['expected'])[:80]!r}", hint="this device generates differently from the package's "
                                                          "builder; not switched")
        return {"samples": len(golden), "min_prefix_agreement": round(worst, 4)}

    def fresh_metrics(self):
        """New figures from the moment the model serves (the warm-up and self-test are not traffic)."""
        from ..metrics import TextMetrics

        self.text_metrics = TextMetrics()
        self.text_metrics.engine = self.engine
        self.engine.metrics = self.text_metrics
        return self.text_metrics

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="openvino-genai", device=self.device, task=self.task, context_length=self.context_length,
                   pipeline=getattr(self, "pipeline", "continuous"),
                   max_running=self.engine.max_running, max_queue=self.engine.max_queue)
        return out

    def close(self) -> None:
        self.engine.close(timeout=120)


class OpenVinoGenAiRuntime(Runtime):
    name = "openvino-genai"
    extra = "agent-llm"

    @classmethod
    def check_importable(cls) -> None:
        _genai()

    @classmethod
    def version(cls) -> str:
        return str(_genai().__version__)

    @classmethod
    def devices(cls) -> list[str]:
        import openvino as ov

        return list(ov.Core().available_devices)

    @classmethod
    def load(cls, model_path: Path, *, device: str = "CPU", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> TextGenerationModel:
        genai = _genai()
        options = dict(options or {})
        folder = Path(model_path).parent
        serving = dict(options.get("serving") or {})
        sched = genai.SchedulerConfig()
        sched.cache_size = max(1, int(round(float(serving.get("kv_cache_gb") or options.get("kv_cache_gb") or 1.0))))
        sched.max_num_seqs = int(serving.get("max_running", 8))
        sched.enable_prefix_caching = bool(serving.get("prefix_caching", True))
        props = {str(k): v for k, v in (options.get("runtime_options") or {}).items()}
        if threads and device == "CPU":
            props["INFERENCE_NUM_THREADS"] = int(threads)
        mode = str(serving.get("pipeline", "auto"))
        stateful = mode == "stateful" or (mode == "auto" and device == "NPU")
        context = int(options.get("context_length") or 0)
        try:
            if stateful:
                from ..textgen import StatefulPipeline

                llm = genai.LLMPipeline(str(folder), device, **props)
                tokenizer = llm.get_tokenizer()
                pipe = StatefulPipeline(llm, genai.StreamerBase, genai.StreamingStatus)
                serving["max_running"] = 1
                if "MAX_PROMPT_LEN" in props:  # an NPU compiles for this prompt length and answer length
                    context = min(context or 1 << 30, int(props["MAX_PROMPT_LEN"]) +
                                  int(props.get("MIN_RESPONSE_LEN", 128)))
            else:
                pipe = genai.ContinuousBatchingPipeline(str(folder), sched, device, props)
                tokenizer = pipe.get_tokenizer()
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign model: one line
            raise UnsupportedError(f"openvino-genai: cannot load {folder.name} on {device}: {type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        model = TextGenerationModel(pipe, tokenizer, name=str(options.get("name", folder.name)), context_length=context,
                                    eos_token_id=options.get("eos_token_id"), serving=serving, device=device,
                                    version=str(options.get("version", "")))
        model.pipeline = "stateful" if stateful else "continuous"
        return model
