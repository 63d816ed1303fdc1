"""``python -m benchmarks NAME``: the benchmarks behind BENCHMARKS.md, one module each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def native_bf16() -> bool:
    """CUDA, or a CPU with AMX / AVX-512-BF16. Elsewhere bf16 matmuls take a slow path (46x fp32's
    time on an AVX2 EPYC, BENCHMARKS.md item 1) and one bf16 SmolLM2 step takes minutes."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


AUTOCAST_HELP = "none (fp32) and/or bf16; auto = bf16 too where it has hardware"


def _autocasts(text: str) -> list[str]:
    if text != "auto":
        return _strs(text)
    return ["none", "bf16"] if native_bf16() else ["none"]


def cmd_bench(args) -> int:
    results = args.bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _scale(args):
    from benchmarks import scale

    return scale.run(_ints(args.clients), rounds=args.rounds, model=args.model, out=args.out)


def _dp_overhead(args):
    from benchmarks import dp_overhead

    return dp_overhead.run(args.model, args.batch, args.length, _strs(args.modes), _autocasts(args.autocast),
                           args.repeats, args.steps)


def _throughput(args):
    from benchmarks import throughput

    return throughput.run(args.model, args.batch, args.length, args.mode, args.repeats,
                          autocasts=tuple(_autocasts(args.autocast)))


def _traffic(args):
    from benchmarks import traffic

    return traffic.run(args.model, verify=args.verify, out=args.out)


def _overhead(args):
    from benchmarks import overhead

    return overhead.run(args.model, args.clients, args.rounds, args.steps, args.batch, args.length, args.out)


def _privacy_utility(args):
    from benchmarks import privacy_utility
    from fedslm.common.config import parse_assignment

    overrides = dict(parse_assignment(item) for item in args.set)
    return privacy_utility.run(_strs(args.tasks), _strs(args.epsilons), args.rounds, args.steps, args.batch,
                               args.length, args.eval_examples, args.model, args.out, overrides)


def _warm_start(args):
    from benchmarks import warm_start

    return warm_start.run(args.records, args.steps, args.lr, args.rounds, args.reference, args.out)


def _secagg(args):
    from benchmarks import secagg

    return secagg.run(args.model, args.clients, args.rounds, args.out)


def _quant(args):
    from benchmarks import quant

    return quant.run(args)


def _adapter_ship(args):
    from benchmarks import adapter_ship

    return adapter_ship.run(args)


def _virtual_steps(args):
    from benchmarks import virtual_steps

    return virtual_steps.run(args.model, args.length, _ints(args.expected), args.physical, _strs(args.loss),
                             args.repeats)


def _recipe(args):
    from benchmarks import recipe

    return recipe.run(args.point, records=args.records, budget=args.budget, epsilon=args.epsilon, length=args.length,
                      model=args.model, dev_records=args.dev_records, task=args.task, device=args.device)


def _phone_memory(args):
    from benchmarks import phone_memory

    return phone_memory.run(args.round, _strs(args.profiles), args.steps)


def _label_scoring(args):
    from benchmarks import label_scoring

    return label_scoring.run(args.model, args.records, args.length, args.batch, _ints(args.classes))


def _llamacpp(args):
    from benchmarks import llamacpp

    return llamacpp.run(args.files, new_tokens=args.new_tokens)


def _noise(args):
    from benchmarks import noise

    return noise.run(args.repeats, args.layers, _ints(args.records), args.dg_samples,
                     [float(x) for x in _strs(args.dg_sigmas)], args.seed)


def _accountant(args):
    from benchmarks import accountant

    return accountant.run()


def _privacy_unit(args):
    from benchmarks import privacy_unit

    return privacy_unit.run(_strs(args.parts), records=args.records, rounds=args.rounds, steps=args.steps,
                            batch=args.batch, k=args.k, length=args.length, model=args.model,
                            eval_examples=args.eval_examples, repeats=args.repeats, out=args.out)


def add_bench_parser(parser: argparse.ArgumentParser) -> None:
    """One subcommand per benchmark on ``parser``."""
    names = parser.add_subparsers(dest="bench_name", required=True, metavar="NAME")

    def add(name: str, func, help_: str, batch: int = 0, length: int = 0) -> argparse.ArgumentParser:
        """A benchmark's parser; ``batch``/``length`` > 0 add --model, --batch, --length with those defaults."""
        parser = names.add_parser(name, help=help_)
        parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        parser.set_defaults(func=cmd_bench, bench=func)
        if batch:
            parser.add_argument("--model", default="smollm2")
            parser.add_argument("--batch", type=int, default=batch)
            parser.add_argument("--length", type=int, default=length)
        return parser

    scale = add("scale", _scale, "phone scenario at several client counts: peak memory of the process tree, time")
    scale.add_argument("--clients", default="100,1000,1090", help="comma-separated client counts")
    scale.add_argument("--rounds", type=int, default=2)
    scale.add_argument("--model", default="", help="model (default: the scenario's, SmolLM2)")
    scale.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")

    dp = add("dp-overhead", _dp_overhead, "DP-SGD step vs non-private step per grad-sample mode and dtype", 8, 128)
    dp.add_argument("--modes", default="hooks,functorch,ghost")
    dp.add_argument("--autocast", default="auto", help=AUTOCAST_HELP)
    dp.add_argument("--repeats", type=int, default=3)
    dp.add_argument("--steps", type=int, default=1, help="steps per configuration per repeat")

    tp = add("throughput", _throughput, "training tokens/s against the matmul roofline, with a profile", 8, 128)
    tp.add_argument("--mode", default="hooks", help="grad-sample mode of the DP step")
    tp.add_argument("--autocast", default="auto", help=AUTOCAST_HELP)
    tp.add_argument("--repeats", type=int, default=2)

    tr = add("traffic", _traffic, "bytes per client per round vs the full fp32 model, per aggregation and wire dtype")
    tr.add_argument("--model", default="smollm2")
    tr.add_argument("--verify", action="store_true", help="also run 1-round tiny federations and check the bytes")
    tr.add_argument("--out", type=Path, help="keep the verification runs here")

    ov = add("overhead", _overhead, "federated run wall time vs the pure compute of the same steps", 8, 128)
    ov.add_argument("--clients", type=int, default=2)
    ov.add_argument("--rounds", type=int, default=2)
    ov.add_argument("--steps", type=int, default=8)
    ov.add_argument("--out", type=Path, help="keep the federated run here")
    sa = add("secagg", _secagg, "secure aggregation (SecAgg+) vs clear FFA: messages, bytes, seconds per round")
    sa.add_argument("--model", default="tiny")
    sa.add_argument("--clients", type=int, default=4)
    sa.add_argument("--rounds", type=int, default=2)
    sa.add_argument("--out", type=Path, help="keep the runs here")
    from benchmarks.quant import add_arguments as quant_arguments

    quant_arguments(add("quant", _quant, "size and eval-loss change of F16/Q8_0/Q4_0 GGUF exports of a run's adapter"))
    from benchmarks.adapter_ship import add_arguments as adapter_ship_arguments

    adapter_ship_arguments(add("adapter-ship", _adapter_ship, "bytes per shipped adapter update and the gain it "
                                                              "keeps on Q8_0/Q4_0 device bases"))
    vs = add("virtual-steps", _virtual_steps, "peak RSS and time of one DP step by expected batch, physical "
             "batch and loss (full logits vs chunked at loss positions)")
    vs.add_argument("--model", default="smollm2")
    vs.add_argument("--length", type=int, default=128)
    vs.add_argument("--expected", default="8,64,256", help="comma-separated expected (logical) batch sizes")
    vs.add_argument("--physical", type=int, default=8, help="train.physical-batch-size (0 = one piece)")
    vs.add_argument("--loss", default="chunked", help="comma-separated: full, chunked")
    vs.add_argument("--repeats", type=int, default=1, help="timed steps per configuration (median)")
    rc = add("recipe", _recipe, "DP-SGD settings under a fixed budget of examples: SST-2 dev accuracy per point")
    rc.add_argument("--point", action="append", required=True,
                    help="key=value;... (batch, clip, lr, optimizer, rank, layers, targets, autocast, ffa, "
                         "noise dp|clip|none); repeat")
    rc.add_argument("--task", choices=("sst2", "medquad"), default="sst2")
    rc.add_argument("--device", default="auto", help="model.device: auto, cpu, cuda, cuda:N")
    rc.add_argument("--records", type=int, default=2000, help="the client's training records (0 = all it has)")
    rc.add_argument("--budget", type=int, default=4096, help="examples per point (steps x expected batch)")
    rc.add_argument("--epsilon", type=float, default=8.0, help="inf = DP off")
    rc.add_argument("--length", type=int, default=64)
    rc.add_argument("--dev-records", type=int, default=0, help="0 = all (SST-2 dev: 872; MedQuAD held out: 100)")
    rc.add_argument("--model", default="smollm2")
    pm = add("phone-memory", _phone_memory, "peak resident memory of one client round by stage, per memory profile")
    pm.add_argument("--round", choices=("dp", "phone"), default="dp",
                    help="dp = a hospital client's DP-SGD round; phone = the phone scenario's round")
    pm.add_argument("--profiles", default="fp32,int8,phone", help="comma-separated, from benchmarks/phone_memory.py")
    pm.add_argument("--steps", type=int, default=3)
    ls = add("label-scoring", _label_scoring, "label evaluation per record: one-pass scorer vs one forward of the "
             "prompt vs the K-pass scorer, K=2 (SST-2) and K=24", 8, 128)
    ls.add_argument("--records", type=int, default=12, help="SST-2 dev sentences")
    ls.add_argument("--classes", default="2,24", help="comma-separated K: 2 (SST-2 labels), 24 (word labels)")
    lc = add("llamacpp", _llamacpp, "llama.cpp vs transformers on the same GGUF files (needs the llamacpp extra)")
    lc.add_argument("files", type=Path, nargs="+", help="GGUF files")
    lc.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated per prompt")
    pu = add("privacy-utility", _privacy_utility, "utility at eps 1, 3, 8, inf with the same compute per point",
             8, 64)
    pu.add_argument("--tasks", default="sst2,pubmedqa,medquad",
                    help="from sst2, sst2-dev, pubmedqa, medquad, medquad-qtype (14 classes, 4 institutes)")
    pu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for every point (a recipe: lora.layers, train.autocast, dp.clip-norm, ...)")
    pu.add_argument("--epsilons", default="1,3,8,inf")
    pu.add_argument("--rounds", type=int, default=3)
    pu.add_argument("--steps", type=int, default=8)
    pu.add_argument("--eval-examples", type=int, default=64)
    pu.add_argument("--out", type=Path, help="keep the runs here")
    ws = add("warm-start", _warm_start, "the hospital demo at eps 8 from the seed's adapter and from one trained on "
             "public MedQuAD institutes no site holds")
    ws.add_argument("--records", type=int, default=1000, help="public question/answer pairs")
    ws.add_argument("--steps", type=int, default=100, help="warm-start steps")
    ws.add_argument("--lr", type=float, default=1e-3)
    ws.add_argument("--rounds", type=int, default=3)
    ws.add_argument("--reference", action="store_true", help="also rerun the demo without DP")
    ws.add_argument("--out", type=Path, help="keep the runs here")
    pun = add("privacy-unit", _privacy_unit, "patient-level vs record-level DP on MedQuAD grouped by focus: "
              "utility at eps 8, step time, memory as units grow", 8, 128)
    pun.add_argument("--parts", default="step,memory,utility", help="from step, memory, utility")
    pun.add_argument("--records", type=int, default=240, help="records per institute (whole focuses)")
    pun.add_argument("--rounds", type=int, default=3)
    pun.add_argument("--steps", type=int, default=5, help="local steps per round")
    pun.add_argument("--k", type=int, default=4, help="most records of one patient per step")
    pun.add_argument("--eval-examples", type=int, default=32, help="held-out records per site")
    pun.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    pun.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    add("accountant", _accountant, "a site's calibration and reservation per round: cached RDP curves against "
        "Opacus' stock accountants, in one process and in a fresh process per round (same answers checked)")
    nz = add("noise", _noise, "the DP noise generator per DP-SGD step: ChaCha20 vs torch's Mersenne Twister "
             "(Gaussian noise, Poisson mask, share of a SmolLM2 step), and an exact discrete Gaussian's cost")
    nz.add_argument("--repeats", type=int, default=7, help="timed draws per configuration (median)")
    nz.add_argument("--layers", type=int, default=30, help="adapted decoder layers (SmolLM2-135M: 30)")
    nz.add_argument("--records", default="225,100000", help="comma-separated record counts of the Poisson mask")
    nz.add_argument("--dg-samples", type=int, default=2000, help="discrete Gaussian samples per sigma")
    nz.add_argument("--dg-sigmas", default="10,32768", help="discrete Gaussian sigmas in grid units "
                    "(32768 = noise multiplier 0.5 on a grid of 2^-16 C)")
    nz.add_argument("--seed", type=int, default=-1, help="-1 = a fresh key; >= 0 reproducible draws (same speed)")
