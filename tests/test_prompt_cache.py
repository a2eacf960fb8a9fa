"""The prompt cache: a job whose prompt was encoded before by the same text encoders with the same weights reuses
that encoding (no encoder run, no encoder load) and draws the same image as a job that encodes it; anything that
changes the encoders' weights or input (another prompt, negative prompt, precision of the encoders, a LoRA on a
text encoder) encodes again."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipelines.cli import build_parser
from pipelines.config import manager_config
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.prompt_cache import DEFAULT_ENTRIES, PromptCache
from pipelines.request import GenerationRequest
from tests.tiny_loras import SDXL_TE, SDXL_UNET, write_kohya, write_peft
from ui.formatting import result_markdown
from conftest import fast_16bit_cpu


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt-cache-loras")
    write_kohya(folder / "with-text.safetensors", SDXL_UNET + SDXL_TE, seed=3)
    write_peft(folder / "unet-only.safetensors", "unet", SDXL_UNET, seed=4)
    return folder


def new_manager(lora_dir=None, **fields) -> PipelineManager:
    config = ManagerConfig(device="cpu", **({"lora_dir": lora_dir} if lora_dir else {}), **fields)
    return PipelineManager(config, device_info=fast_16bit_cpu())


@pytest.fixture(scope="module")
def cached(lora_dir):
    manager = new_manager(lora_dir)
    yield manager
    manager.close()


@pytest.fixture(scope="module")
def uncached(lora_dir):
    manager = new_manager(lora_dir, prompt_cache_entries=0)
    yield manager
    manager.close()


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def request(model, prompt: str, **fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "model": str(model), "steps": 2, "seed": 1, "width": 32,
                                "height": 32, **fields})


def text_ms(result) -> float:
    return result.timings.text_encoders_ms


# ---------------------------------------------------------------------- the cache itself

def test_the_least_recently_used_entry_goes_first_and_a_failure_keeps_nothing():
    cache, runs = PromptCache(entries=2), []

    def encode(value):
        return lambda: runs.append(value) or value

    assert [cache.get_or_encode(k, encode(k)) for k in ("a", "b", "a", "c", "a", "b")] == ["a", "b", "a", "c", "a", "b"]
    assert runs == ["a", "b", "c", "b"]  # "b" went when "c" came ("a" had been used since); "a" stayed
    assert len(cache) == 2 and (cache.hits, cache.misses) == (2, 4)

    def fail():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        cache.get_or_encode("d", fail)
    assert cache.get_or_encode("d", encode("d")) == "d" and runs[-1] == "d"  # the failure was not kept


def test_no_entries_keeps_nothing():
    cache, runs = PromptCache(entries=0), []
    for _ in range(3):
        cache.get_or_encode("a", lambda: runs.append(1))
    assert len(runs) == 3 and len(cache) == 0


# ---------------------------------------------------------------------- in the manager

@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_a_repeat_skips_the_text_encoders_and_draws_the_image_an_encoding_job_draws(family, cached, uncached,
                                                                                    tiny_flux, tiny_sdxl):
    model = tiny_flux if family == "flux" else tiny_sdxl
    extra = {"negative_prompt": "blurry", "guidance": 5.0} if family == "sdxl" else {}
    first = cached.generate(request(model, f"a {family} fox under a green moon", **extra))
    repeat = request(model, f"a {family} fox under a green moon", seed=7, width=48, steps=3, **extra)
    again = cached.generate(repeat)
    assert text_ms(first) > 0 and text_ms(again) == 0
    encoded = uncached.generate(repeat)
    assert text_ms(encoded) > 0  # the manager without a cache encodes every job
    assert np.array_equal(pixels(again), pixels(encoded))
    # what the user reads: the reuse said in words rather than as "0 ms"
    assert again.timings.prompt_reused and not encoded.timings.prompt_reused
    reused = "text encoders: prompt reused"
    assert reused in result_markdown(again) and reused in again.timings.summary()
    assert "prompt reused" not in result_markdown(encoded)


def test_another_prompt_or_negative_prompt_is_encoded_again(cached, uncached, tiny_sdxl):
    base = request(tiny_sdxl, "a blue owl on a red roof", negative_prompt="blurry", guidance=5.0)
    cached.generate(base)
    for changed in (replace(base, prompt="a blue owl on a red roof at night"), replace(base, negative_prompt="dark")):
        result = cached.generate(changed)
        assert text_ms(result) > 0, changed
        assert np.array_equal(pixels(result), pixels(uncached.generate(changed)))


def test_a_repeat_loads_no_text_encoder_after_they_were_evicted(cached, tiny_flux):
    job = request(tiny_flux, "a yellow kite over grey hills")
    cached.generate(job)
    cached.residency.evict_all("memory wanted elsewhere")  # what a tight budget does between jobs
    seen = []
    cached.generate(replace(job, seed=2), on_progress=seen.append)
    resident = {r.key.name for r in cached.status().resident}
    assert "transformer" in resident and not resident & {"text_encoder", "text_encoder_2"}
    assert not any("text_encoder" in p.message for p in seen if p.stage == "load")


def test_a_lora_on_a_text_encoder_encodes_again_a_lora_on_the_unet_alone_does_not(cached, uncached, tiny_sdxl):
    prompt = "a purple tram in the rain"
    base = cached.generate(request(tiny_sdxl, prompt))
    with_text = request(tiny_sdxl, prompt, loras=(("with-text", 1.0),))
    styled = cached.generate(with_text)
    assert text_ms(styled) > 0
    assert np.array_equal(pixels(styled), pixels(uncached.generate(with_text)))
    half = cached.generate(replace(with_text, loras=(("with-text", 0.5),)))  # another scale: other weights
    assert text_ms(half) > 0
    unet_only = cached.generate(request(tiny_sdxl, prompt, loras=(("unet-only", 1.0),)))
    assert text_ms(unet_only) == 0  # the text encoders' weights are those of the plain job
    plain = cached.generate(request(tiny_sdxl, prompt))
    assert text_ms(plain) == 0 and np.array_equal(pixels(plain), pixels(base))


def test_each_precision_encodes_with_its_own_text_encoders(cached, tiny_flux):
    prompt = "a white lighthouse at dawn"
    cached.generate(request(tiny_flux, prompt, precision="bf16"))
    assert text_ms(cached.generate(request(tiny_flux, prompt, precision="fp8"))) == 0  # its encoders are bf16 too
    assert text_ms(cached.generate(request(tiny_flux, prompt, precision="fp16"))) > 0  # fp16 encoders


def test_a_cut_prompt_still_warns_when_its_encoding_is_reused(cached, tiny_flux):
    prompt = " ".join(["green triangle"] * 40)  # far beyond the tiny model's 32 T5 tokens
    first = cached.generate(request(tiny_flux, prompt))
    again = cached.generate(request(tiny_flux, prompt, seed=5))
    assert text_ms(again) == 0
    assert any("cut off" in w for w in first.warnings) and any("cut off" in w for w in again.warnings)


def test_unloading_forgets_the_encodings(tiny_flux):
    manager = new_manager()
    try:
        job = request(tiny_flux, "an orange boat")
        manager.generate(job)
        assert len(manager.prompts) == 1
        manager.unload()
        assert len(manager.prompts) == 0 and text_ms(manager.generate(job)) > 0
    finally:
        manager.close()


def test_the_flag_turns_it_off_and_the_bench_measures_a_new_prompt_each_run():
    parse = build_parser().parse_args
    assert manager_config(parse(["generate", "a fox"])).prompt_cache_entries == DEFAULT_ENTRIES
    assert manager_config(parse(["generate", "a fox", "--no-prompt-cache"])).prompt_cache_entries == 0
    assert manager_config(parse(["bench", "a fox"])).prompt_cache_entries == 0


def test_the_app_takes_the_flag_too_and_a_value_given_to_it_is_refused_in_one_line(capsys):
    from ui.launch import options_from_args

    assert options_from_args(["--no-prompt-cache"]).manager.prompt_cache_entries == 0
    assert options_from_args([]).manager.prompt_cache_entries == DEFAULT_ENTRIES
    for parse in (lambda argv: build_parser().parse_args(["generate", "a fox", *argv]), options_from_args):
        with pytest.raises(SystemExit) as exit_:
            parse(["--no-prompt-cache=yes"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--no-prompt-cache" in err and "ignored explicit argument" in err and "Traceback" not in err
