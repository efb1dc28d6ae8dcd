# llama.py — Llama: the llama-cpp-python-compatible facade over Model, Context and Sampler.
# Scripts written for llama_cpp.Llama run with `import moqae_cpp as llama_cpp`: same keyword names,
# same completion / chat dict shapes, streaming generators. All numerics (decode, sampling,
# perplexity) happen in C; this file only keeps the token bookkeeping, the text assembly (_text.py)
# and the chat template (_chat.py). Beyond llama-cpp-python: kv_cache_stats(), perplexity().
# Reference for the shapes: llama-cpp-python 0.3.x docs (create_completion, create_chat_completion).
from __future__ import annotations

import os
import random
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ._chat import ChatTemplate, chunks_to_chat, completion_to_chat
from ._context import Context
from ._model import Model
from ._router import Router
from ._sampler import Sampler, default_sampler_params
from ._text import TextAssembler
from .errors import ContextFullError, Interrupted, InvalidTokenError
from ._closable import Closable

# Sampling defaults come from moqae_sampler_default_params() (they equal llama-cpp-python's
# documented ones: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.0). Rounded
# to 6 digits because the C fields are float32 (0.8f is 0.800000011920929 as a double).
_SP = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in default_sampler_params().items()}

# llama_cpp.Llama parameters that have no meaning here; accepted (so scripts run) with a warning.
_IGNORED_INIT = frozenset((
    "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap", "kv_overrides", "n_ubatch",
    "n_threads_batch", "rope_scaling_type", "pooling_type", "attention_type", "rope_freq_base", "rope_freq_scale",
    "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "embedding",
    "offload_kqv", "flash_attn", "op_offload", "swa_full", "no_perf", "lora_base", "lora_scale", "lora_path",
    "numa", "chat_format", "chat_handler", "draft_model", "tokenizer", "type_k", "type_v", "spm_infill",
))

# llama_cpp sampling options we do not implement: allowed only at their llama-cpp-python default.
_UNSUPPORTED_SAMPLING = {
    "suffix": None, "typical_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "tfs_z": 1.0,
    "mirostat_mode": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "stopping_criteria": None,
    "logits_processor": None, "grammar": None, "logit_bias": None, "penalize_nl": True,
    "functions": None, "function_call": None, "tools": None, "tool_choice": None, "response_format": None,
}


def _reject_unsupported(options: dict) -> None:
    for name, value in options.items():
        if name not in _UNSUPPORTED_SAMPLING:
            raise TypeError(f"unexpected keyword argument {name!r}")
        if value != _UNSUPPORTED_SAMPLING[name]:
            raise NotImplementedError(f"moqae_cpp does not implement {name}={value!r} (leave it at its default)")


def _logprobs_rows(rows: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 for accuracy."""
    x = rows.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Llama(Closable):
    """A model and one context, with llama-cpp-python's `Llama` interface.

    Args:
        model_path: GGUF model file.
        router_path: MoQAE router GGUF (docs/ROUTER-FORMAT.md): it picks each KV chunk's expert
            (FP16, INT4, INT2 ...) instead of the fixed `kv` policy; give one or the other.
        n_ctx: context length in tokens. Defaults to 512 like llama_cpp.Llama (not the C default, the
            model's training context); 0 means the model's training context.
        n_batch: prompt micro-batch in tokens; None = the C default (512).
        n_threads: worker threads; None = the C default (all online CPUs).
        seed: sampling seed used when a call gives none; None = the C default (0); negative = random.
        kv: KV cache policy ("fp16", "int8", "int4", "int2", "sink+int4", "sink+int2"; the CLI's --kv);
            None = the C default (fp16).
        kv_budget: bytes for the encoded KV chunks (the CLI's --kv-budget); None or 0 = sized from
            n_ctx and the policy or the router's expected bits.
        kv_bits: instead of kv_budget, a budget of this many effective bits per KV element over n_ctx
            tokens (the CLI's --kv-bits), e.g. 3.0 with kv_overflow="demote".
        kv_overflow: what a full KV cache does: "error" (the C default), "shift" (drop the oldest
            chunks) or "demote" (re-encode the oldest chunks to fewer bits; a router file with
            demotion weights orders the records by age x weight of their layer).
        kv_keys: where quantized chunks hold their keys: "pre" (before RoPE, the C default: the more
            exact) or "post" (after RoPE: a faster decode attention on the GPU for a little more error;
            the CLI's --kv-keys).
        n_gpu_layers: layers to offload to CUDA: the last n_gpu_layers and the output head (0 = CPU only,
            -1 (as llama-cpp-python) or >= the model's layers = all; ignored with a warning without CUDA).
        use_mlock: lock the weights in RAM; None = the C default (no).
        logits_all: keep the logits of every evaluated token (needed for `logprobs`), not only the
            last one. Costs n_tokens x n_vocab floats.
        last_n_tokens_size: tokens the repetition penalty looks at; None = the C default (64).
        verbose: log what the library does at INFO to stderr (through logging "moqae_cpp").

    Several Llama objects may be used from several threads at once (the GIL is released while C
    computes); one Llama is for one thread at a time.
    """

    def __init__(self, model_path: str | os.PathLike, *, router_path: str | os.PathLike | None = None,
                 n_gpu_layers: int = 0, use_mlock: bool | None = None, seed: int | None = None, n_ctx: int = 512,
                 n_batch: int | None = None, n_threads: int | None = None, kv: str | None = None,
                 kv_budget: int | None = None, kv_bits: float | None = None, kv_overflow: str | None = None,
                 kv_keys: str | None = None, logits_all: bool = False, last_n_tokens_size: int | None = None, verbose: bool = False,
                 **kwargs: Any):
        self._model: Model | None = None
        self._router: Router | None = None
        self._ctx: Context | None = None
        unknown = sorted(set(kwargs) - _IGNORED_INIT)
        if unknown:
            raise TypeError(f"Llama() got unexpected keyword arguments: {', '.join(unknown)}")
        if kwargs:
            warnings.warn(f"moqae_cpp.Llama ignores llama_cpp options: {', '.join(sorted(kwargs))}", stacklevel=2)
        if verbose:
            from . import _enable_verbose_logging

            _enable_verbose_logging()
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        self._model = Model(self.model_path, n_gpu_layers=n_gpu_layers, use_mlock=use_mlock)
        try:
            if router_path is not None:
                self._router = Router(self._model, router_path)
            self._ctx = Context(self._model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv=kv,
                                router=self._router, kv_budget=kv_budget, kv_overflow=kv_overflow,
                                kv_bits=kv_bits, kv_keys=kv_keys)
        except BaseException:
            if self._router is not None:
                self._router.close()
            self._model.close()
            raise
        info = self._model.info
        self._n_vocab = info["n_vocab"]
        self._n_ctx = self._ctx.n_ctx()
        self._n_batch = n_batch if n_batch else min(self._n_ctx, 512)  # only slices Python-side evals
        self._n_threads = n_threads
        self._kv = kv
        self._logits_all = bool(logits_all)
        self._repeat_last_n = last_n_tokens_size
        self._seed = _SP["seed"] if seed is None else seed
        self._tokens: list[int] = []  # the tokens in the C context, in order
        self._rows: list[np.ndarray] = []  # logits_all: logits blocks covering self._tokens
        self._last_ok = False  # the C context holds logits for the last token of self._tokens
        self._last_row = 0  # which kept row that is
        self._epoch = 0  # bumped by every public call that changes the context
        self._stop = False  # interrupt() was called during the running call
        self._chat: ChatTemplate | None = None

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context, then the router and the model. Idempotent; the object is unusable
        afterwards."""
        if self._ctx is not None:
            self._ctx.close()
        if self._router is not None:
            self._router.close()
        if self._model is not None:
            self._model.close()


    @property
    def router_info(self) -> dict | None:
        """The router's metadata (chunk_size, experts, expert_bits, n_router, group_size,
        hidden_size, freeze_first_chunk, lambda, expected_bits), or None without a router."""
        return dict(self._router.info) if self._router is not None else None

    # ---- llama_cpp.Llama basics ----------------------------------------------------------------

    def n_ctx(self) -> int:
        return self._ctx.n_ctx()

    def n_vocab(self) -> int:
        self._model.ptr
        return self._n_vocab

    def n_embd(self) -> int:
        self._model.ptr
        return self._model.info["n_embd"]

    def token_bos(self) -> int:
        self._model.ptr
        return self._model.info["token_bos"]

    def token_eos(self) -> int:
        self._model.ptr
        return self._model.info["token_eos"]

    def token_nl(self) -> int:
        return self.tokenize(b"\n", add_bos=False, special=False)[-1]

    def set_seed(self, seed: int) -> None:
        """The seed used by calls that give none."""
        self._seed = seed

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text (UTF-8 bytes; a str is encoded). add_bos: add BOS/EOS as the model's
        metadata says. special: parse special-token text like "<|im_start|>"."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self._model.tokenize(bytes(text), add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        """The bytes of tokens. With prev_tokens (the tokens before them) the result is the text
        the tokens add, so a leading space is kept; without, the model's leading space is removed."""
        if prev_tokens is not None:
            return b"".join(self._model.token_to_piece(int(t), special=special) for t in tokens)
        return self._model.detokenize([int(t) for t in tokens], special=special)

    @property
    def n_tokens(self) -> int:
        """Tokens currently in the context."""
        return len(self._tokens)

    @property
    def input_ids(self) -> np.ndarray:
        """A copy of the tokens currently in the context (int32)."""
        return np.array(self._tokens, dtype=np.intc)

    @property
    def scores(self) -> np.ndarray:
        """Logits as a float32 copy. logits_all=True: (n_tokens, n_vocab), one row per token in the
        context. Otherwise (1, n_vocab) for the last evaluated token, or (0, n_vocab) if none."""
        if self._logits_all:
            return self._all_rows().copy()
        if not self._last_ok:
            return np.empty((0, self._n_vocab), dtype=np.float32)
        return self._ctx.logits(self._last_row, 1)

    def reset(self) -> None:
        """Forget every token in the context."""
        self._epoch += 1
        self._reset_state()

    def eval(self, tokens: Sequence[int]) -> None:
        """Append tokens to the context and run the model on them (see `scores`)."""
        self._epoch += 1
        self._stop = False
        self._eval([int(t) for t in tokens])

    def interrupt(self) -> None:
        """From another thread: stop the eval or generation running now (between micro-batches or
        tokens); it raises moqae_cpp.Interrupted and the object stays usable. A call that starts
        later is not affected."""
        self._stop = True
        if self._ctx is not None:
            self._ctx.interrupt()

    def _check_stop(self) -> None:
        if self._stop:
            self._stop = False
            raise Interrupted("interrupted by Llama.interrupt()", "MOQAE_ERR_INTERRUPTED")

    # ---- token bookkeeping ---------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._ctx.reset()
        self._tokens.clear()
        self._rows.clear()
        self._last_ok = False

    def _all_rows(self) -> np.ndarray:
        if not self._rows:
            return np.empty((0, self._n_vocab), dtype=np.float32)
        if len(self._rows) > 1:
            self._rows[:] = [np.concatenate(self._rows)]
        return self._rows[0]

    def _rows_at(self, positions: list[int]) -> np.ndarray:
        """Logits rows (logits_all) of the given context positions, without joining the blocks."""
        ends = np.cumsum([len(r) for r in self._rows])
        out = np.empty((len(positions), self._n_vocab), dtype=np.float32)
        for k, p in enumerate(positions):
            b = int(np.searchsorted(ends, p, side="right"))
            out[k] = self._rows[b][p - (int(ends[b - 1]) if b else 0)]
        return out

    def _recover(self) -> None:
        """After an exception inside an evaluation (KeyboardInterrupt, Interrupted, ...): make the
        bookkeeping match the C context again, or reset both when that is impossible."""
        self._last_ok = False
        n_past = self._ctx.n_past()
        n_rows = sum(len(r) for r in self._rows)
        if n_past <= len(self._tokens) and (not self._logits_all or n_rows == n_past):
            del self._tokens[n_past:]
        else:
            self._reset_state()

    def _check_room(self, n: int) -> None:
        if len(self._tokens) + n > self._n_ctx:
            raise ContextFullError(f"context full: {len(self._tokens)} tokens in the context + {n} new > n_ctx "
                                   f"{self._n_ctx}", "MOQAE_ERR_CONTEXT_FULL")

    def _eval(self, tokens: list[int]) -> None:
        if not tokens:
            return
        self._check_room(len(tokens))
        bad = next((t for t in tokens if not 0 <= t < self._n_vocab), None)
        if bad is not None:  # checked up front so no slice is half-applied
            raise InvalidTokenError(f"token id {bad} is outside the vocabulary [0, {self._n_vocab})",
                                    "MOQAE_ERR_INVALID_TOKEN")
        self._last_ok = False
        ctx, nb = self._ctx, self._n_batch
        try:
            # Python-side slices let Ctrl-C land between micro-batches of a long prompt.
            for i in range(0, len(tokens), nb):
                self._check_stop()
                part = tokens[i:i + nb]
                keep = len(part) if self._logits_all else (1 if i + nb >= len(tokens) else 0)
                self._tokens.extend(part)
                ctx.decode(part, keep)
                if self._logits_all:
                    self._rows.append(ctx.logits(0, keep))
            self._last_row = keep - 1
            self._last_ok = True
        except BaseException:
            self._recover()
            raise

    def _eval_one(self, token: int) -> None:
        """The per-token path of generation (the token came from the sampler, so it is valid)."""
        self._check_room(1)
        self._last_ok = False
        self._tokens.append(token)
        try:
            self._ctx.decode_one(token)
            if self._logits_all:
                self._rows.append(self._ctx.logits(0, 1))
        except BaseException:
            self._recover()
            raise
        self._last_row = 0
        self._last_ok = True

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            raise RuntimeError("this generator is stale: another call on the same Llama changed the context")

    # ---- generation ----------------------------------------------------------------------------

    def _sampler(self, *, temp, top_k, top_p, min_p, repeat_penalty, seed) -> Sampler:
        if seed is None:
            seed = self._seed
        if seed < 0:
            seed = random.getrandbits(64)
        return Sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       repeat_last_n=self._repeat_last_n, seed=seed)

    def _start(self, tokens: list[int], reset: bool) -> None:
        """Get the context to hold tokens with fresh logits for the last one. reset=True reuses the
        context when it is a strict prefix of tokens (the C cache cannot drop tokens, so a longer
        or diverging context is emptied); reset=False appends tokens to the context."""
        if reset:
            n = len(self._tokens)
            if 0 < n < len(tokens) and tokens[:n] == self._tokens:
                tokens = tokens[n:]
            else:
                self._reset_state()
        if tokens:
            self._eval(tokens)
        elif not self._last_ok:
            raise ValueError("nothing to evaluate: give at least one token")

    def _token_stream(self, tokens: list[int], sampler: Sampler, *, reset: bool = True) -> Iterator[int]:
        """Evaluate tokens, then sample forever: each yielded token is evaluated when the caller asks
        for the next one. Owns (and frees) sampler."""
        epoch = self._epoch = self._epoch + 1
        self._stop = False
        try:
            self._start(tokens, reset)
            last_n = self._repeat_last_n if self._repeat_last_n is not None else _SP["repeat_last_n"]
            history = self._tokens[-last_n:] if last_n > 0 else []
            for t in history:
                sampler.accept(t)
            n_vocab = self._n_vocab
            while True:
                self._check_epoch(epoch)
                self._check_stop()
                tok = sampler.sample(self._ctx.logits_ptr(self._last_row), n_vocab)
                sampler.accept(tok)
                yield tok
                self._check_epoch(epoch)
                self._eval_one(tok)
        finally:
            sampler.close()

    def generate(self, tokens: Sequence[int], top_k: int = _SP["top_k"], top_p: float = _SP["top_p"],
                 min_p: float = _SP["min_p"], typical_p: float = 1.0, temp: float = _SP["temp"],
                 repeat_penalty: float = _SP["repeat_penalty"], reset: bool = True, *, seed: int | None = None,
                 **unsupported: Any) -> Iterator[int]:
        """Yield sampled tokens after the prompt tokens, forever (stop iterating when done; the
        end-of-generation token is yielded like any other). reset=True starts from an empty context
        (a cached prefix is reused); reset=False appends tokens to the current context."""
        _reject_unsupported({"typical_p": typical_p, **unsupported})
        tokens = [int(t) for t in tokens]
        sampler = self._sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                seed=seed)
        return self._token_stream(tokens, sampler, reset=reset)

    # ---- completions ---------------------------------------------------------------------------

    def create_completion(self, prompt: str | Sequence[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = _SP["temp"], top_p: float = _SP["top_p"],
                          min_p: float = _SP["min_p"], typical_p: float = 1.0, logprobs: int | None = None,
                          echo: bool = False, stop: str | list[str] | None = None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = _SP["repeat_penalty"],
                          top_k: int = _SP["top_k"], stream: bool = False, seed: int | None = None, *,
                          model: str | None = None, **unsupported: Any) -> dict | Iterator[dict]:
        """Complete prompt (a str, or token ids used as they are). Returns a "text_completion" dict
        like llama-cpp-python's, or with stream=True a generator of chunks of the same shape whose
        last one carries finish_reason ("stop": end-of-generation token or a stop string; "length":
        max_tokens, or the context is full). max_tokens None or <= 0: until the context is full.
        Streaming yields only complete UTF-8 and holds back text that could start a stop string.
        logprobs needs logits_all=True, as in llama-cpp-python."""
        _reject_unsupported({"suffix": suffix, "typical_p": typical_p, "frequency_penalty": frequency_penalty,
                             "presence_penalty": presence_penalty, **unsupported})
        if isinstance(prompt, (bytes, bytearray)):
            prompt = prompt.decode("utf-8")
        if isinstance(prompt, str):
            prompt_tokens = self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            prompt_text = prompt
        else:
            prompt_tokens = [int(t) for t in prompt]
            prompt_text = None
        if not prompt_tokens:
            bos = self.token_bos()
            if bos < 0:
                raise ValueError("the prompt is empty and the model has no BOS token to start from")
            prompt_tokens = [bos]
        if len(prompt_tokens) >= self._n_ctx:
            raise ContextFullError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {self._n_ctx}",
                                   "MOQAE_ERR_CONTEXT_FULL")
        bad = next((t for t in prompt_tokens if not 0 <= t < self._n_vocab), None)
        if bad is not None:
            raise InvalidTokenError(f"token id {bad} is outside the vocabulary [0, {self._n_vocab})",
                                    "MOQAE_ERR_INVALID_TOKEN")
        room = self._n_ctx - len(prompt_tokens)
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        if logprobs is not None and not self._logits_all:
            raise ValueError("logprobs is not supported for models created with logits_all=False")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        sampler = self._sampler(temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        run = self._run_completion(prompt_tokens, prompt_text, sampler, max_tokens=max_tokens, stops=stops,
                                   stream=stream, echo=echo, logprobs=logprobs, model=model)
        if stream:
            return run
        try:
            return next(run)
        finally:
            run.close()

    __call__ = create_completion

    def _run_completion(self, prompt_tokens: list[int], prompt_text: str | None, sampler: Sampler, *,
                        max_tokens: int, stops: list[str], stream: bool, echo: bool, logprobs: int | None,
                        model: str | None) -> Iterator[dict]:
        head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": model if model is not None else self.model_path}

        def chunk(text: str, finish_reason: str | None, lp: dict | None = None) -> dict:
            return {**head, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason}]}

        text = TextAssembler([s.encode("utf-8") for s in stops])
        completion: list[int] = []
        finish = "length"
        sent = 0  # completion tokens whose logprobs were streamed
        n_prompt = len(prompt_tokens)
        tokens = self._token_stream(prompt_tokens, sampler)
        try:
            if stream and echo:
                yield chunk(prompt_text if prompt_text is not None else
                            self.detokenize(prompt_tokens).decode("utf-8", "replace"), None)
            for tok in tokens:
                if self._model.token_is_eog(tok):
                    finish = "stop"
                    break
                completion.append(tok)
                out = text.push(self._model.token_to_piece(tok))
                if stream and out:
                    lp = None
                    if logprobs is not None:
                        lp = self._logprobs(prompt_tokens + completion, n_prompt + sent, logprobs, 0)
                        sent = len(completion)
                    yield chunk(out.decode("utf-8", "replace"), None, lp)
                if text.stop_at is not None:
                    finish = "stop"
                    break
                if len(completion) >= max_tokens:
                    break
        finally:
            tokens.close()
        if stream:
            rest = text.flush()
            if rest:
                yield chunk(rest.decode("utf-8", "replace"), None)
            yield chunk("", finish)
            return
        out_text = text.text().decode("utf-8", "replace")
        if echo:
            out_text = (prompt_text if prompt_text is not None else
                        self.detokenize(prompt_tokens).decode("utf-8", "replace")) + out_text
        lp = None
        if logprobs is not None:
            first = 0 if echo else n_prompt
            offset0 = 0 if echo else len(prompt_text or self.detokenize(prompt_tokens).decode("utf-8", "replace"))
            lp = self._logprobs(prompt_tokens + completion, first, logprobs, offset0)
            if echo and lp["tokens"]:
                lp["token_logprobs"][0] = None
                lp["top_logprobs"][0] = None
        res = chunk(out_text, finish, lp)
        res["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(completion),
                        "total_tokens": n_prompt + len(completion)}
        yield res

    def _logprobs(self, seq: list[int], first: int, top: int, offset0: int) -> dict:
        """OpenAI-style logprobs for seq[first:]; token i's distribution is logits row i-1."""
        bos = self.token_bos()
        idx = [i for i in range(first, len(seq)) if not (i == 0 and seq[i] == bos)]
        lps = _logprobs_rows(self._rows_at([max(i - 1, 0) for i in idx])) if idx else np.empty((0, self._n_vocab))
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        offset = offset0
        for i, lp in zip(idx, lps):
            piece = self._model.token_to_piece(seq[i]).decode("utf-8", "replace")
            k = min(max(int(top), 0), self._n_vocab)
            best = np.argpartition(-lp, k - 1)[:k] if k > 0 else []
            tops = {self._model.token_to_piece(int(j)).decode("utf-8", "replace"): float(lp[j]) for j in best}
            tops[piece] = float(lp[seq[i]])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(float(lp[seq[i]]) if i > 0 else None)
            out["top_logprobs"].append(tops if i > 0 else None)
            offset += len(piece)
        return out

    # ---- chat ----------------------------------------------------------------------------------

    def _chat_template(self) -> ChatTemplate:
        if self._chat is None:
            template = self._model.meta_str("tokenizer.chat_template")
            if template is None:
                raise ValueError(f"{self.model_path} has no tokenizer.chat_template: use create_completion")

            def text_of(tok: int) -> str:
                return self._model.token_to_piece(tok, special=True).decode("utf-8", "replace") if tok >= 0 else ""

            self._chat = ChatTemplate(template, bos_token=text_of(self.token_bos()), eos_token=text_of(self.token_eos()))
        return self._chat

    def create_chat_completion(self, messages: list[dict], functions: list | None = None,
                               function_call: Any = None, tools: list | None = None, tool_choice: Any = None,
                               temperature: float = 0.2, top_p: float = _SP["top_p"], top_k: int = _SP["top_k"],
                               min_p: float = _SP["min_p"], typical_p: float = 1.0, stream: bool = False,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               response_format: dict | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = _SP["repeat_penalty"], *, model: str | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None,
                               **unsupported: Any) -> dict | Iterator[dict]:
        """Apply the model's chat template (tokenizer.chat_template, Jinja2) to messages and complete
        it. Returns a "chat.completion" dict, or with stream=True a generator of
        "chat.completion.chunk" dicts. temperature=0.2 and max_tokens=None (until the end of the
        turn or a full context) are llama-cpp-python's chat defaults. Tools, functions and
        response_format are not implemented (NotImplementedError unless None)."""
        _reject_unsupported({"functions": functions, "function_call": function_call, "tools": tools,
                             "tool_choice": tool_choice, "response_format": response_format})
        template = self._chat_template()
        prompt = template.render(messages, add_generation_prompt=True)
        tokens = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if template.eos_token:
            stops.append(template.eos_token)
        result = self.create_completion(tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        min_p=min_p, typical_p=typical_p, logprobs=top_logprobs if logprobs else None,
                                        stop=stops, frequency_penalty=frequency_penalty,
                                        presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k,
                                        stream=stream, seed=seed, model=model, **unsupported)
        if stream:
            return chunks_to_chat(result)
        return completion_to_chat(result)

    # ---- beyond llama-cpp-python ---------------------------------------------------------------

    def kv_cache_stats(self) -> dict:
        """The KV cache: n_tokens, n_ctx, n_chunks per expert ({"fp16", "int8", "int4", "int2"}),
        nominal_bits and effective_bits (scales and zeros included) per element, bytes_used,
        bytes_reserved."""
        return self._ctx.kv_stats()

    def perplexity(self, text: str | bytes, *, n_ctx: int | None = None, n_chunks: int | None = None,
                   progress: Callable[[int, int, float], object] | None = None) -> dict:
        """Perplexity of text with llama.cpp's method (moqae_perplexity): windows of n_ctx tokens
        (default: this context's n_ctx; a larger one uses a temporary context), the second half of
        each scored. Returns {ppl, ppl_err, nll, n_scored, n_chunks}. Empties this context."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        tokens = self._model.tokenize(data, add_special=True, parse_special=False)
        self._epoch += 1
        if n_ctx is not None and n_ctx > self._n_ctx:
            with Context(self._model, n_ctx=n_ctx, n_threads=self._n_threads, kv=self._kv,
                         router=self._router) as tmp:
                return tmp.perplexity(tokens, n_ctx=n_ctx, n_chunks=n_chunks, progress=progress)
        try:
            return self._ctx.perplexity(tokens, n_ctx=n_ctx, n_chunks=n_chunks, progress=progress)
        finally:
            self._tokens.clear()
            self._rows.clear()
            self._last_ok = False
