"""`mmca bench` part (a): the kernel against the roof, on a tiny model (figures not asserted)."""

import json

from mmca.bench.inputs import RandomTokens
from mmca.cli import main
from mmca.engine.bank import bucket_length
from mmca.engine.pairs import pair_flops


def test_bench_reports_the_roof_and_counts_flops_at_the_bucket_lengths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--only", "a", "--score-images", "2", "--score-captions", "12", "--hidden", "32",
            "--heads", "4", "--img-dim", "16", "--txt-dim", "16", "--regions", "4",
            "--fused-kernel", "off", "--json", str(out)]  # off: no compile (tests/engine/test_fused.py)
    assert main(argv) == 0
    roof = json.loads(out.read_text())["roof"]
    lengths = RandomTokens(12, 16, seed=12).lengths
    want = sum(pair_flops(4, bucket_length(int(n), 4), 32, 32, 256, (1, 2, 3)) for n in lengths) / len(lengths)
    assert abs(roof["fp32_pair_mflop"] - want / 1e6) < 1e-9
    # a fraction of the roof, and the rate it comes from: pairs/s x FLOP/pair
    assert roof["fp32_roof_gflops"] > 0 and 0 < roof["fp32_kernel_roof_fraction"] <= 1
    gflops = roof["fp32_kernel_pairs_per_s"] * roof["fp32_pair_mflop"] / 1e3
    assert abs(roof["fp32_kernel_gflops"] - gflops) <= 1e-9 * gflops
    assert abs(roof["fp32_kernel_roof_fraction"] - gflops / roof["fp32_roof_gflops"]) <= 1e-9
    assert roof["cpu_capability"] and "% of the roof" in capsys.readouterr().out


def test_bench_search_needs_a_gallery(capsys):
    assert main(["bench", "--search"]) == 2
    assert "--search needs the gallery to search: --dataset ROOT" in capsys.readouterr().err
