"""LoRA adapters on a Lumina-mGPT pipeline: load, mix, fuse, unfuse and unload PEFT adapters, with the
method names diffusers' LoRA loader mixins use (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...).

Adapters are injected in place through PEFT's integration API (`peft.functional`): the pipeline's model
stays a `LuminaMGPTForConditionalGeneration`, so generation works unchanged. transformers' own PEFT
integration (`model.load_adapter`) is not used: it pins PEFT versions that the registry may not serve.

An adapter trained by `lumina-hf train` may also carry new values for the lm_head rows of the UniRep
tokens (PEFT "trainable tokens"). PEFT activates at most one such set of rows at a time; to mix several
adapters by weight, the rows are mixed here as `original + sum_i w_i (rows_i - original)` into one
derived row set, the same linear rule LoRA weights follow.
"""

import logging
import os
import warnings

import torch

logger = logging.getLogger(__name__)

# name of the derived row set that holds a weighted mix of several adapters' lm_head rows
_MIXED_ROWS = "lumina_mixed_rows"
# PEFT saves adapter keys under the PeftModel wrapper's prefix; injected layers live on the bare model
_SAVED_PREFIX = "base_model.model."


def _peft():
    """PEFT's public integration API, imported on first use (generation alone does not need PEFT)."""
    import peft
    import peft.functional
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper, TrainableTokensWrapper

    return peft, peft.functional, BaseTunerLayer, AuxiliaryTrainingWrapper, TrainableTokensWrapper


def _unwrapped(module):
    """The plain layer under PEFT's adapter layers, if any (adapters may already be injected)."""
    if hasattr(module, "token_adapter"):  # PEFT's trainable-tokens wrapper
        module = module.token_adapter
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


class LuminaMGPTLoraLoaderMixin:
    """LoRA methods of `LuminaMGPTPipeline`; they act on `self.model`.

    ```py
    pipe.load_lora_weights("style-a", adapter_name="a")
    pipe.load_lora_weights("style-b", adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    pipe.fuse_lora()          # no adapter overhead while generating
    pipe.unfuse_lora()        # the base weights back, bit for bit
    pipe.unload_lora_weights()
    ```
    """

    # ------------------------------------------------------------------ state
    def _lora_state(self) -> dict:
        """Per-pipeline bookkeeping: adapter weights and, while fused, the replaced base weights."""
        state = self.__dict__.get("_lumina_lora")
        if state is None:
            state = {"weights": {}, "fused": None}
            self.__dict__["_lumina_lora"] = state
        return state

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters per component, as diffusers reports them: `{"model": [names...]}`."""
        return {"model": list(getattr(self.model, "peft_config", None) or {})}

    def get_active_adapters(self) -> list[str]:
        """The adapters that take part in the forward pass, in load order."""
        *_, base_layer_cls, _, _ = _peft()
        active: list[str] = []
        for module in self.model.modules():
            if isinstance(module, base_layer_cls) and not getattr(module, "disable_adapters", False):
                active.extend(a for a in module.active_adapters if a not in active and a != _MIXED_ROWS)
        return [name for name in self.get_list_adapters()["model"] if name in active]

    def _adapter_layers(self):
        *_, base_layer_cls, _, tokens_cls = _peft()
        return [m for m in self.model.modules() if isinstance(m, base_layer_cls) and not isinstance(m, tokens_cls)]

    def _token_wrappers(self):
        *_, tokens_cls = _peft()
        return [m for m in self.model.modules() if isinstance(m, tokens_cls)]

    # ------------------------------------------------------------------ loading
    def load_lora_weights(self, pretrained_model_name_or_path, adapter_name: str | None = None, **kwargs) -> None:
        """Load a PEFT LoRA adapter into `self.model` and make it the only active adapter (weight 1.0).

        `pretrained_model_name_or_path` is a folder with `adapter_config.json` and `adapter_model.safetensors`
        (what `lumina-hf train` writes to `output_dir/adapter`) or a Hub id; `kwargs` go to the Hub download
        (`revision`, `token`, `cache_dir`, ...). `adapter_name` defaults to "default" (then "default_1", ...).
        The adapter's trained lm_head image rows, if any, are applied too.

        Raises `ValueError`, with the model unchanged, when the folder has no `adapter_config.json`, the name is
        taken, or the adapter was trained on another base model (a module or tensor shape that does not match).
        """
        peft, functional, *_ = _peft()
        loaded = self.get_list_adapters()["model"]
        if adapter_name is None:
            adapter_name = next(n for n in ("default", *(f"default_{i}" for i in range(1, len(loaded) + 2))) if n not in loaded)
        if adapter_name in loaded:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded: pass another adapter_name.")
        if adapter_name == _MIXED_ROWS:
            raise ValueError(f"{_MIXED_ROWS!r} is reserved for mixed adapter rows: pick another adapter_name.")
        if self._lora_state()["fused"] is not None:
            raise ValueError("adapters are fused into the weights: call unfuse_lora() before loading another.")
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "adapter_config.json")):
            raise ValueError(
                f"{source} has no adapter_config.json: give the adapter folder written by PEFT "
                "(`lumina-hf train` writes it to <output_dir>/adapter)."
            )
        config = peft.PeftConfig.from_pretrained(source, **kwargs)
        if config.peft_type != peft.PeftType.LORA:
            raise ValueError(f"{source} holds a {config.peft_type} adapter; only LoRA adapters can be loaded.")
        config.inference_mode = True
        state_dict = {k.removeprefix(_SAVED_PREFIX): v for k, v in peft.load_peft_weights(source, **kwargs).items()}
        self._check_adapter_fits(source, config, state_dict)

        previous = self.get_active_adapters()
        try:
            with warnings.catch_warnings():
                # PEFT warns that a second adapter is being added to a model that already has one: intended here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                functional.inject_adapter_in_model(config, self.model, adapter_name=adapter_name)
            # PEFT looks up every trainable-tokens wrapper of the model in the adapter file, also one that this
            # adapter does not train (rows loaded earlier by another adapter); the entry it builds from a
            # placeholder matches no parameter and is dropped as an unexpected key.
            for name, module in self.model.named_modules():
                key = f"{name}.token_adapter.trainable_tokens_delta"
                if hasattr(module, "token_adapter") and adapter_name not in module.token_adapter.trainable_tokens_delta:
                    state_dict.setdefault(key, torch.empty(0))
            result = functional.set_peft_model_state_dict(self.model, state_dict, adapter_name=adapter_name)
            missing = [
                k for k in result.missing_keys
                if ("lora_" in k or "trainable_tokens_delta" in k) and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
            ]
            if missing:
                raise ValueError(f"the adapter file lacks {len(missing)} tensors, e.g. {missing[0]}")
        except Exception as err:
            self._remove_adapter(adapter_name, restore_active=previous)
            raise ValueError(f"could not load the adapter {source}: {err}") from err
        self._lora_state()["weights"][adapter_name] = 1.0
        self.set_adapters([adapter_name])

    def _check_adapter_fits(self, source: str, config, state_dict: dict) -> None:
        """Every tensor of the adapter matches a module of this model in shape, before anything is injected."""
        modules = {name: _unwrapped(m) for name, m in self.model.named_modules()}
        rows = getattr(config, "trainable_token_indices", None) or {}
        for key, tensor in state_dict.items():
            if ".lora_A." in key or ".lora_B." in key:
                target = key.split(".lora_")[0]
                base = modules.get(target)
                if not isinstance(base, torch.nn.Linear):
                    raise ValueError(
                        f"{source}: {key} adapts {target!r}, which is not a linear layer of this model: the adapter "
                        "was trained on another base model."
                    )
                # lora_A is (rank, in_features), lora_B is (out_features, rank)
                want = (tensor.shape[0], base.in_features) if ".lora_A." in key else (base.out_features, tensor.shape[1])
                if tuple(tensor.shape) != want:
                    raise ValueError(
                        f"{source}: {key} has shape {tuple(tensor.shape)}, this model needs {want}: the adapter was "
                        "trained on another base model."
                    )
            elif key.endswith("token_adapter.trainable_tokens_delta"):
                target = key.split(".token_adapter")[0]
                base = modules.get(target)
                indices = rows.get(target, []) if isinstance(rows, dict) else rows
                if not isinstance(base, (torch.nn.Linear, torch.nn.Embedding)):
                    raise ValueError(f"{source}: {key} adapts {target!r}, which this model does not have.")
                width = base.weight.shape[1]
                if tuple(tensor.shape) != (len(indices), width) or (indices and max(indices) >= base.weight.shape[0]):
                    raise ValueError(
                        f"{source}: {key} holds rows of shape {tuple(tensor.shape)} for token ids up to "
                        f"{max(indices) if indices else None}; this model's {target} is {tuple(base.weight.shape)}: the "
                        "adapter was trained on another base model."
                    )

    # ------------------------------------------------------------------ choosing adapters
    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None, *, weights=None) -> None:
        """Activate the named adapters, each scaled by its weight (default 1.0): the model computes with
        `W + sum_i w_i * delta_i`. `weights=` is accepted as another name for `adapter_weights`."""
        if weights is not None:
            if adapter_weights is not None:
                raise ValueError("give adapter_weights or weights, not both.")
            adapter_weights = weights
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            adapter_weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            adapter_weights = [float(adapter_weights)] * len(names)
        adapter_weights = [float(w) for w in adapter_weights]
        loaded = self.get_list_adapters()["model"]
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}: the loaded adapters are {loaded}.")
        if len(adapter_weights) != len(names):
            raise ValueError(f"{len(adapter_weights)} weights for {len(names)} adapters: give one weight per adapter.")
        if not names:
            raise ValueError("give at least one adapter name (disable_lora() turns all adapters off).")
        if self._lora_state()["fused"] is not None:
            raise ValueError("adapters are fused into the weights: call unfuse_lora() before changing them.")
        self._apply_adapters(names, adapter_weights)
        self._lora_state()["weights"].update(zip(names, adapter_weights))

    def _apply_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        for layer in self._adapter_layers():
            layer.set_adapter(names)
            if hasattr(layer, "set_scale"):
                for name, w in zip(names, adapter_weights):
                    layer.set_scale(name, w)
        for wrapper in self._token_wrappers():
            self._apply_rows(wrapper, names, adapter_weights)

    @staticmethod
    def _apply_rows(wrapper, names: list[str], adapter_weights: list[float]) -> None:
        """Activate the lm_head rows of `names` on one PEFT trainable-tokens wrapper, mixed by weight when
        there is more than one set or a weight is not 1."""
        tokens = wrapper.token_adapter
        present = [(n, w) for n, w in zip(names, adapter_weights) if n in tokens.trainable_tokens_delta]
        if _MIXED_ROWS in tokens.trainable_tokens_delta:
            wrapper.delete_adapter(_MIXED_ROWS, new_active_adapters=None)
        if not present:
            wrapper.set_adapter([])  # none of these adapters trained rows here: the base rows apply
            return
        if len(present) == 1 and present[0][1] == 1.0:
            wrapper.set_adapter(present[0][0])
            return
        index = sorted({i for n, _ in present for i in tokens.token_indices[n]})
        weight = tokens.get_base_layer().weight
        mixed = weight.detach()[index].clone()
        position = {tok: k for k, tok in enumerate(index)}
        for n, w in present:
            at = torch.tensor([position[i] for i in tokens.token_indices[n]], device=mixed.device)
            delta = tokens.trainable_tokens_delta[n].detach() - tokens.trainable_tokens_original[n]
            mixed.index_add_(0, at, (w * delta.to(torch.float32)).to(mixed.dtype))
        wrapper.update(_MIXED_ROWS, token_indices=index)
        tokens.trainable_tokens_delta[_MIXED_ROWS].data.copy_(mixed)
        tokens.trainable_tokens_delta[_MIXED_ROWS].requires_grad_(False)
        wrapper.set_adapter(_MIXED_ROWS)

    def disable_lora(self) -> None:
        """Run the base model: every adapter stays loaded but inactive (`enable_lora()` turns them back on)."""
        for module in self._adapter_layers() + self._token_wrappers():
            module.enable_adapters(False)

    def enable_lora(self) -> None:
        """Undo `disable_lora()`."""
        for module in self._adapter_layers() + self._token_wrappers():
            module.enable_adapters(True)

    # ------------------------------------------------------------------ fusing
    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None, safe_fusing: bool = False) -> None:
        """Merge the active (or the named) adapters, at their weights times `lora_scale`, into the base weights:
        no adapter overhead while generating. The replaced weights are kept in CPU memory so that
        `unfuse_lora()` restores them bit for bit. `safe_fusing` refuses an adapter that would write NaN/inf."""
        state = self._lora_state()
        if not self.get_list_adapters()["model"]:
            raise ValueError("no LoRA adapter is loaded: call load_lora_weights() first.")
        if state["fused"] is not None:
            raise ValueError("adapters are already fused: call unfuse_lora() first.")
        names = self.get_active_adapters() if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.get_list_adapters()["model"]]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}: the loaded adapters are {self.get_list_adapters()['model']}.")
        adapter_weights = [state["weights"].get(n, 1.0) for n in names]
        self._apply_adapters(names, [w * lora_scale for w in adapter_weights])
        saved = {}
        for module in self._adapter_layers():
            if any(n in getattr(module, "lora_A", {}) for n in names):
                base = module.get_base_layer()
                saved[base] = base.weight.detach().to("cpu", copy=True)
                module.merge(safe_merge=safe_fusing, adapter_names=[n for n in names if n in module.lora_A])
        for wrapper in self._token_wrappers():
            wrapper.token_adapter.merge(safe_merge=safe_fusing)
        state["fused"] = {"names": names, "weights": adapter_weights, "saved": saved}

    def unfuse_lora(self) -> None:
        """Undo `fuse_lora()`: the base weights come back exactly; the adapters stay loaded and active."""
        state = self._lora_state()
        fused = state["fused"]
        if fused is None:
            return
        for module in self._adapter_layers():
            if module.merged:
                module.unmerge()
            base = module.get_base_layer()
            if base in fused["saved"]:
                with torch.no_grad():
                    base.weight.copy_(fused["saved"][base])
        for wrapper in self._token_wrappers():
            if wrapper.token_adapter.merged:
                wrapper.token_adapter.unmerge()
        state["fused"] = None
        self.set_adapters(fused["names"], fused["weights"])

    # ------------------------------------------------------------------ removing
    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove the named adapters; the others stay as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.get_list_adapters()["model"]
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}: the loaded adapters are {loaded}.")
        if self._lora_state()["fused"] is not None:
            raise ValueError("adapters are fused into the weights: call unfuse_lora() before deleting any.")
        for name in names:
            remaining = [a for a in self.get_active_adapters() if a != name]
            self._remove_adapter(name, restore_active=remaining)

    def _remove_adapter(self, name: str, restore_active: list[str]) -> None:
        """Take one adapter out of every layer (all adapter layers when it was the last one)."""
        _, functional, *_ = _peft()
        configs = getattr(self.model, "peft_config", None) or {}
        others = [n for n in configs if n != name]
        if not others:
            self.unload_lora_weights()
            return
        for wrapper in self._token_wrappers():
            if _MIXED_ROWS in wrapper.token_adapter.trainable_tokens_delta:
                wrapper.delete_adapter(_MIXED_ROWS, new_active_adapters=None)
        functional.delete_adapter(self.model, name, prefix="lora_")
        configs.pop(name, None)
        self._lora_state()["weights"].pop(name, None)
        active = [n for n in restore_active if n in others] or others[:1]
        self.set_adapters(active, [self._lora_state()["weights"].get(n, 1.0) for n in active])

    def unload_lora_weights(self) -> None:
        """Remove every adapter layer from the model. Fused adapters stay in the weights (fuse, unload, save is how
        to write a merged pipeline); unfused ones are dropped, giving back the base model."""
        *_, base_layer_cls, aux_cls, _ = _peft()
        replaced: list[str] = []
        for name, module in list(self.model.named_modules()):
            if any(name.startswith(prefix + ".") for prefix in replaced):
                continue
            if isinstance(module, aux_cls):
                # a trainable-tokens wrapper: a fused row set is already in the base weight
                base = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
            elif isinstance(module, base_layer_cls):
                base = module.get_base_layer()
            else:
                continue
            self.model.set_submodule(name, base)
            replaced.append(name)
        self.model.__dict__.pop("peft_config", None)
        state = self._lora_state()
        state["weights"].clear()
        state["fused"] = None


__all__ = ["LuminaMGPTLoraLoaderMixin"]
