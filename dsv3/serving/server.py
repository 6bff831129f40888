"""`dsv3 serve`: load a checkpoint, start the engine loop, serve the OpenAI API with uvicorn.

SIGINT/SIGTERM (uvicorn's handlers) stop accepting connections and wait for the open requests to finish;
the lifespan's end then drains the engine and stops its loop, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch

from dsv3.serving.app import ServerState, create_app
from dsv3.serving.engine import Engine

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    engine: Engine = app.state.server.engine
    engine.start()
    logger.info("engine started: max batch %d, %d cache blocks of %d tokens", engine.max_batch,
                engine.blocks.num_blocks, engine.blocks.block_size)
    yield
    logger.info("draining the engine")
    engine.stop(drain=True)


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown on SIGINT/SIGTERM, without re-raising the signal afterwards: a server that
        drained its requests exits 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer


def build_state(model: torch.nn.Module, tokenizer: Any, model_name: str, *, max_batch: int = 32,
                max_queue: int = 256, api_key: str | None = None, block_size: int = 16,
                num_blocks: int | None = None, token_budget: int = 256, prefix_caching: bool = True,
                speculative: str | None = None) -> ServerState:
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, block_size=block_size,
                    num_blocks=num_blocks, token_budget=token_budget, prefix_caching=prefix_caching,
                    speculative=speculative)
    return ServerState(engine, tokenizer, model_name, api_key)


def serve(model_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
          device: str = "auto", max_batch: int = 32, max_queue: int = 256, api_key: str | None = None,
          served_model_name: str | None = None, block_size: int = 16, num_blocks: int | None = None,
          token_budget: int = 256, prefix_caching: bool = True, speculative: str | None = None,
          log_level: str = "info", weights: dict[str, Any] | None = None) -> None:
    """Serve model_dir until SIGINT/SIGTERM (blocks). weights: from_pretrained's keywords for how the weights
    are held (quantization, head_quantization, fp8, kernels)."""
    import uvicorn

    from dsv3 import DeepseekV3ForCausalLM
    from dsv3.tokenizer import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a checkpoint directory (no config.json); pass --model DIR")
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, device_map=device,
                                                  load_mtp=speculative == "mtp", **(weights or {})).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir if (model_dir / "tokenizer.json").is_file() else None)
    state = build_state(model, tokenizer, served_model_name or model_dir.name, max_batch=max_batch,
                        max_queue=max_queue, api_key=api_key, block_size=block_size, num_blocks=num_blocks,
                        token_budget=token_budget, prefix_caching=prefix_caching, speculative=speculative)
    app = create_app(state)
    app.router.lifespan_context = _lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    _server_class()(config).run()
