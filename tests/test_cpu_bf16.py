"""On a CPU, TRL's default bf16=True is turned off unless the user asks for it: without native bf16 every training
step would be ~10x slower, and with it the numbers would differ from other CPUs'."""

from simple_rlhf import arguments


def parse_sft(monkeypatch, tmp_path, argv, fast_bf16=False, config=None):
    from trl import SFTConfig

    monkeypatch.setattr(arguments, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if config is not None:
        path = tmp_path / "sft.yaml"
        path.write_text(config)
        argv = ["--config", str(path), *argv]
    (args,) = arguments.parse_args((SFTConfig,), ["--output_dir", str(tmp_path / "out"), *argv])
    return args


def test_bf16_off_by_default_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    assert parse_sft(monkeypatch, tmp_path, []).bf16 is False


def test_bf16_kept_when_asked(monkeypatch, tmp_path):
    assert parse_sft(monkeypatch, tmp_path, ["--bf16", "true"]).bf16 is True
    assert parse_sft(monkeypatch, tmp_path, [], config="bf16: true\n").bf16 is True


def test_bf16_off_by_default_on_a_cpu_with_native_bf16_too(monkeypatch, tmp_path):
    assert parse_sft(monkeypatch, tmp_path, [], fast_bf16=True).bf16 is False


def test_bf16_kept_for_quantized_models(monkeypatch, tmp_path):
    from trl import ModelConfig, SFTConfig

    monkeypatch.setattr(arguments, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args, _ = arguments.parse_args((SFTConfig, ModelConfig), ["--output_dir", str(tmp_path / "o"), "--use_peft",
                                                          "--load_in_4bit"])
    assert args.bf16 is True
