"""The CPU demo, shortened: every stage runs, and LoRA beats the base model on the new task."""

import math


def test_demo_end_to_end(tmp_path, capsys):
    from howto.demo import main

    result = main(out_dir=tmp_path / "demo", pretrain_steps=150, lora_steps=60, train_examples=600, eval_examples=20)
    # The base model never saw the new task; LoRA (on q and v only) makes its answers clearly more likely.
    assert result["lora_new_task_loss"] < 0.8 * result["base_new_task_loss"]
    assert result["lora_new_task_accuracy"] >= result["base_new_task_accuracy"]
    assert math.isfinite(result["base_new_task_loss"])
    assert result["lora"]["trainable_parameters"] == 4 * 2 * 8 * (128 + 128)  # tiny: 4 layers, q and v, r = 8
    assert (tmp_path / "demo" / "lora" / "lit_lora_finetuned.pth").is_file()
    assert (tmp_path / "demo" / "base" / "lit_model.pth").is_file()
    out = capsys.readouterr().out
    for text in ("=== 1. Data", "=== 2. Pretrain", "=== 3. Teach", "=== 4. Generate", "=== 5. Compare",
                 "rotate: accuracy", "base + LoRA", "Time: data"):
        assert text in out, text
