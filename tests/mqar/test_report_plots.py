"""The summary plots: the state-size axis is the state's shape, and one sequence length makes no length plot."""

import json

from palimpsa.mqar import report


def row(model, shape, state_bytes, test, seq_len=64):
    return dict(model=model, seq_len=seq_len, num_kv_pairs=16, d_model=64, state_shape=shape,
                state_bytes=state_bytes, test_mean=test, test_std=0.01)


def test_state_size_axis_puts_equal_shapes_together(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(fig))
    rows = [row("palimpsa", "4×8×16", 4096, 0.3), row("notpalimpsa", "4×8×16", 2048, 0.5),
            row("palimpsa", "4×16×32", 16384, 0.8), row("notpalimpsa", "4×16×32", 8192, 0.98),
            row("attention", "KV cache", 32768, 1.0)]
    report.plot_accuracy_vs_state_size(rows, tmp_path / "plot.png")
    ax = figures[0].axes[0]
    xs = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in ax.containers}  # one errorbar a model
    for model in ("palimpsa", "notpalimpsa"):  # at H*K*V entries (moved apart by under 5%), not at their bytes
        assert all(abs(x / entries - 1) < 0.05 for x, entries in zip(xs[model], [512, 2048])), xs
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4×8×16", "4×16×32"]
    assert "H×K×V" in ax.get_xlabel() and "bytes" not in ax.get_xlabel()
    assert any(line.get_label() == "attention (KV cache)" for line in ax.lines)


def test_one_sequence_length_writes_no_length_plot(tmp_path):
    records = [dict(model=m, seq_len=64, num_kv_pairs=16, d_model=64, lr=1e-2, seed=s, val_accuracy=0.5,
                    test_accuracy=0.5, state_bytes=2048, steps=10, device="cpu", history=[[10, 1.0, 0.5]],
                    config=dict(num_heads=4, head_k_dim=8, head_v_dim=16))
               for m in ("palimpsa", "notpalimpsa") for s in (0, 1)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, written = report.write_report(tmp_path / "results.jsonl", tmp_path)
    assert sorted(p.name for p in written) == ["accuracy_vs_state_size.png", "accuracy_vs_step.png", "summary.md"]
    records += [dict(r, seq_len=128) for r in records]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, written = report.write_report(tmp_path / "results.jsonl", tmp_path)
    assert "accuracy_vs_seq_len.png" in {p.name for p in written}
    assert (tmp_path / "accuracy_vs_seq_len.png").read_bytes()[:4] == b"\x89PNG"
