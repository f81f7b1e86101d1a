"""Client-level differential privacy: clipping bounds what is folded, the noise is the
keyed stream's and has the right law, the accountant is dp-accounting's (and agrees with
Opacus's), calibration meets its target, and ``emberfl run --dp ...`` gives the same bits
on every runtime and after kill -9 + resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

dpa = pytest.importorskip("dp_accounting", reason="the privacy extra is not installed")

from cli_run import emberfl  # noqa: E402
from emberfl.config import ConfigError, SimulationConfig  # noqa: E402
from emberfl.contrib.fedavg import FedAvgDownlinkPackage, FedAvgUplinkPackage  # noqa: E402
from emberfl.contrib.fedavg.server import SAMPLERS  # noqa: E402
from emberfl.contrib.privacy import (  # noqa: E402
    ClientAccountant,
    ClientLevelDP,
    PrivateDownlinkPackage,
    PrivateUplinkPackage,
    clip_update,
    l2_norm,
    privatize,
    seeded_gaussian,
    update_noise_multiplier,
)
from emberfl.contrib.privacy.noise import Purpose, gaussian_from_os  # noqa: E402
from emberfl.crashpoints import CRASH_ENV  # noqa: E402
from emberfl.metrics import read_metrics  # noqa: E402
from emberfl.streaming import StreamingSum  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# -- clipping ------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [1.0, 0.3, 1e-3, 7.77])
def test_a_long_update_is_clipped_to_the_norm_bit_for_bit(clip: float) -> None:
    gen = torch.Generator().manual_seed(1)
    update = torch.randn(10_001, generator=gen) * 3.0
    clipped, norm = clip_update(update, clip)
    assert norm == pytest.approx(float(update.double().norm()))
    # The float32 bits that are folded are within the bound, and barely below it.
    assert l2_norm(clipped) <= clip
    assert l2_norm(clipped) > clip * (1 - 1e-5)
    assert clipped.dtype == torch.float32
    cosine = float(torch.nn.functional.cosine_similarity(clipped, update, dim=0))
    assert cosine > 1 - 1e-6


def test_a_short_update_passes_unchanged() -> None:
    update = torch.tensor([0.75, -1.0, 0.0])  # norm 1.25, exactly
    clipped, norm = clip_update(update, 1.25)
    assert norm == 1.25
    assert torch.equal(clipped, update)
    assert torch.equal(clip_update(update, 2.0)[0], update)
    nan = torch.tensor([float("nan"), 1.0])
    out, norm = clip_update(nan, 1.0)
    assert math.isnan(norm) and out is nan  # left for the server's non-finite policy


def _payload(model: torch.Tensor, **kw: object) -> PrivateDownlinkPackage:
    fields: dict[str, object] = {"clip": 1.0, "noise_multiplier": 0.0, "noise_seed": 3, "round": 2}
    fields.update(kw)
    return PrivateDownlinkPackage(model_parameters=model, **fields)  # type: ignore[arg-type]


def test_the_uplink_is_the_clipped_update_and_local_noise_is_the_clients_stream() -> None:
    x = torch.zeros(4)
    y = torch.tensor([3.0, 4.0, 0.0, 0.0])  # update of norm 5
    trained = FedAvgUplinkPackage(cid=7, model_parameters=y, data_size=10, metadata={"loss": 1.0})
    up = privatize(trained, _payload(x, clip=1.0))
    assert isinstance(up, PrivateUplinkPackage)
    assert up.cid == 7 and up.data_size == 10
    assert l2_norm(up.model_parameters) <= 1.0
    assert up.metadata == {"loss": 1.0, "update_norm": 5.0, "clip_bit": 0.0}
    inside = privatize(trained, _payload(x, clip=6.0))
    assert torch.equal(inside.model_parameters, y) and inside.metadata["clip_bit"] == 1.0
    # Local DP: the client adds z * C times its own stream, keyed by (seed, round, cid).
    noisy = privatize(trained, _payload(x, clip=6.0, noise_multiplier=0.5))
    noise = seeded_gaussian(4, 3, 2, Purpose.LOCAL, 7)
    expected = (y.double() + 0.5 * 6.0 * noise).float()
    assert torch.equal(noisy.model_parameters, expected)
    with pytest.raises(TypeError, match="PrivateDownlinkPackage"):
        privatize(trained, FedAvgDownlinkPackage(x))


# -- noise ---------------------------------------------------------------------------


def test_the_seeded_noise_is_a_standard_normal_keyed_by_seed_round_and_purpose() -> None:
    n = 200_000
    z = seeded_gaussian(n, 5, 3, Purpose.UPDATE)
    assert z.dtype == torch.float64
    # Mean within 5 standard errors; variance within 5 of its standard errors (2/n).
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / n)
    assert float((z.abs() < 1.0).double().mean()) == pytest.approx(0.6827, abs=0.005)
    assert torch.equal(z, seeded_gaussian(n, 5, 3, Purpose.UPDATE))
    for other in (
        seeded_gaussian(n, 6, 3, Purpose.UPDATE),
        seeded_gaussian(n, 5, 4, Purpose.UPDATE),
        seeded_gaussian(n, 5, 3, Purpose.COUNT),
        seeded_gaussian(n, 5, 3, Purpose.LOCAL, 0),
    ):
        assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.02


def test_the_os_noise_is_a_standard_normal_and_never_repeats() -> None:
    n = 200_001  # odd: Box-Muller makes pairs
    z = gaussian_from_os(n)
    assert z.shape == (n,) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / n)
    assert not torch.equal(z[:100], gaussian_from_os(100))


def _sums(updates: list[torch.Tensor]) -> StreamingSum:
    sums = StreamingSum()
    for u in updates:
        sums.add([("update", u, 1.0)])
    return sums


def _rule(mechanism: str = "central", **kw: object) -> ClientLevelDP:
    fields: dict[str, object] = {
        "mechanism": mechanism,
        "clip": 1.0,
        "noise_multiplier": 1.3,
        "expected_clients": 4.0,
        "accountant": ClientAccountant("poisson", 100, 0.04),
        "delta": 1e-5,
        "seed": 9,
        "count_stddev": 1.0,
    }
    fields.update(kw)
    return ClientLevelDP(**fields)  # type: ignore[arg-type]


def _uplinks(updates: list[torch.Tensor], bits: list[float]) -> list[FedAvgUplinkPackage]:
    return [
        PrivateUplinkPackage(cid=i, model_parameters=u, data_size=5, metadata={"clip_bit": b})
        for i, (u, b) in enumerate(zip(updates, bits, strict=True))
    ]


def test_the_released_model_is_the_noise_free_one_plus_the_rounds_stream() -> None:
    gen = torch.Generator().manual_seed(2)
    model = torch.randn(1000, generator=gen)
    updates = [clip_update(torch.randn(1000, generator=gen), 1.0)[0] for _ in range(3)]
    sums, kept = _sums(updates), _uplinks(updates, [1.0, 1.0, 1.0])
    rule = _rule()
    released = rule.release(model, sums, kept, round=6)
    noise = seeded_gaussian(1000, 9, 6, Purpose.UPDATE)
    total = sums.sum("update").double() + 1.3 * 1.0 * noise
    assert torch.equal(released, (model.double() + total / 4.0).float())
    # Without noise: the exact sum over the fixed denominator (not over the 3 that came).
    quiet = _rule(noise_multiplier=0.0).release(model, sums, kept, round=6)
    assert torch.equal(quiet, (model.double() + sums.sum("update").double() / 4.0).float())
    # The noise's size: (released - quiet) * m / (z C) is the stream, to rounding.
    recovered = (released.double() - quiet.double()) * 4.0 / 1.3
    assert float((recovered - noise).abs().max()) < 1e-5
    # A round without a kept client still releases its noise.
    empty = rule.release(model, None, [], round=6)
    assert torch.equal(empty, (model.double() + 1.3 * noise / 4.0).float())
    with pytest.raises(TypeError, match="not clipped"):
        rule.release(model, sums, [FedAvgUplinkPackage(0, updates[0], 5)], round=6)


def test_local_dp_averages_what_came_and_adds_nothing() -> None:
    model = torch.zeros(3)
    updates = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])]
    rule = _rule("local")
    out = rule.release(model, _sums(updates), _uplinks(updates, [1.0, 1.0]), round=0)
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(rule.release(model, None, [], round=0), model)
    assert rule.downlink(FedAvgDownlinkPackage(model), 3).noise_multiplier == 1.3
    assert _rule().downlink(FedAvgDownlinkPackage(model), 3).noise_multiplier == 0.0


def test_adaptive_clipping_follows_the_noised_count_and_splits_the_noise() -> None:
    # Andrew et al.: 1/z^2 = 1/z_update^2 + 1/(2 sigma_b)^2.
    z_update = update_noise_multiplier(1.0, 2.0)
    assert z_update**-2 + 4.0**-2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(1.0, 0.5)
    model = torch.zeros(10)
    updates = [torch.full((10,), 0.01)] * 4
    rule = _rule("adaptive", noise_multiplier=1.0, count_stddev=2.0, clip_lr=0.2)
    assert rule.update_multiplier == pytest.approx(z_update)
    rule.release(model, _sums(updates), _uplinks(updates, [1.0] * 4), round=1)
    count_noise = float(seeded_gaussian(1, 9, 1, Purpose.COUNT)[0])
    fraction = (4.0 + 2.0 * count_noise) / 4.0
    assert rule.clip == pytest.approx(math.exp(-0.2 * (fraction - 0.5)))
    # With every update inside the bound the clip norm shrinks, round after round.
    quiet = _rule("adaptive", noise_multiplier=0.0, count_stddev=1e-9)
    for r in range(5):
        before = quiet.clip
        quiet.release(model, _sums(updates), _uplinks(updates, [1.0] * 4), round=r)
        assert quiet.clip == pytest.approx(before * math.exp(-0.2 * 0.5))


# -- accounting ----------------------------------------------------------------------


def test_epsilon_is_dp_accountings_for_the_same_event() -> None:
    q, z, rounds, delta = 0.01, 1.1, 200, 1e-5
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    rdp = dpa.rdp.RdpAccountant()
    rdp.compose(event)
    pld = dpa.pld.PLDAccountant()
    pld.compose(event)
    assert ClientAccountant("poisson", 10_000, q).epsilon(z, rounds, delta) == rdp.get_epsilon(
        delta
    )
    assert ClientAccountant("poisson", 10_000, q, "pld").epsilon(
        z, rounds, delta
    ) == pld.get_epsilon(delta)
    # Fixed-size sampling: replace-one neighbours, the sum moves by up to 2C.
    wor = dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(z / 2)), rounds
    )
    replace = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    replace.compose(wor)
    assert ClientAccountant("fixed", 1000, 0.01).epsilon(z, rounds, delta) == replace.get_epsilon(
        delta
    )
    local = dpa.rdp.RdpAccountant()
    local.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / 2), rounds))
    assert ClientAccountant("local", 1000, 0.01).epsilon(z, rounds, delta) == local.get_epsilon(
        delta
    )
    assert ClientAccountant("poisson", 100, q).epsilon(z, 0, delta) == 0.0
    assert ClientAccountant("poisson", 100, q).epsilon(0.0, 3, delta) == math.inf
    with pytest.raises(ValueError, match="PLD"):
        ClientAccountant("fixed", 100, 0.1, "pld")


def test_epsilon_agrees_with_opacus_rdp_accountant() -> None:
    opacus = pytest.importorskip("opacus.accountants", reason="opacus is not installed")
    for q, z, rounds in [(0.01, 1.1, 100), (0.05, 0.8, 50), (0.002, 2.0, 1000)]:
        theirs = opacus.RDPAccountant()
        theirs.history = [(z, q, rounds)]
        mine = ClientAccountant("poisson", 10_000, q).epsilon(z, rounds, 1e-5)
        # The two use different grids of Renyi orders: a few percent at most.
        assert mine == pytest.approx(theirs.get_epsilon(1e-5), rel=0.03)


@pytest.mark.parametrize(
    ("sampling", "target"), [("poisson", 2.0), ("poisson", 0.5), ("fixed", 4.0)]
)
def test_calibration_meets_the_target_and_no_less_noise_would(sampling: str, target: float) -> None:
    acc = ClientAccountant(sampling, 6000, 100 / 6000)
    z = acc.calibrate(target, 1e-5, 100)
    assert acc.epsilon(z, 100, 1e-5) <= target
    assert acc.epsilon(z * 0.99, 100, 1e-5) > target


# -- the sampler -----------------------------------------------------------------------


def test_poisson_sampling_draws_each_client_with_probability_q() -> None:
    import random

    rng = random.Random(4)
    draws = [SAMPLERS["poisson"](rng, 200, 0.1) for _ in range(500)]
    sizes = [len(d) for d in draws]
    assert sum(sizes) / len(sizes) == pytest.approx(20, abs=0.6)
    assert len(set(sizes)) > 5  # the cohort's size varies
    counts = [sum(cid in d for d in draws) for cid in range(200)]
    assert min(counts) > 20 and max(counts) < 85  # every client, near 50 times
    assert all(d == sorted(set(d)) for d in draws)
    assert len(SAMPLERS["fixed"](random.Random(4), 200, 0.1)) == 20


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm": "scaffold", "dp": "central", "noise_multiplier": 1.0}, "scaffold"),
        ({"dp": "central"}, "--noise-multiplier or --target-epsilon"),
        ({"dp": "central", "noise_multiplier": 1.0, "target_epsilon": 2.0}, "both given"),
        ({"dp": "central", "target_epsilon": 2.0, "dp_budget": "stop"}, "needs --noise-multiplier"),
        ({"dp": "central", "noise_multiplier": 1.0, "accountant": "pld"}, "PLD"),
        ({"dp": "adaptive", "noise_multiplier": 1.0, "clip_count_stddev": 0.1}, "count"),
        ({"dp": "central", "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"dp": "central", "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"dp": "gaussian"}, "unknown dp"),
    ],
)
def test_settings_that_cannot_run_are_one_clear_error(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**settings).validate()


# -- emberfl run, as a user types it ---------------------------------------------------

COMMAND = [
    "run", "--clients", "20", "--sample-ratio", "0.3", "--rounds", "4", "--epochs", "1",
    "--seed", "3", "--no-progress", "--quiet",
]  # fmt: skip
DP = ["--dp", "central", "--clip", "0.5", "--noise-multiplier", "1.1"]


def _run(out: Path, *flags: str) -> None:
    done = emberfl(*COMMAND, *flags, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def private_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "run"
    _run(out, *DP)  # the default runtime and workers
    return out


def test_a_private_run_writes_epsilon_and_its_privacy_record(private_run: Path) -> None:
    metrics = read_metrics(private_run)
    eps = metrics["epsilon"].tolist()
    acc = ClientAccountant("fixed", 20, 0.3)
    assert eps == [acc.epsilon(1.1, r, 1e-5) for r in (1, 2, 3, 4)]
    assert metrics["clip_norm"].tolist() == [0.5] * 4
    record = json.loads((private_run / "config.json").read_text())
    assert record["dp"] == "central" and record["clip"] == 0.5 and record["delta"] == 1e-5
    privacy = record["privacy"]
    assert privacy["sampling"] == "fixed" and privacy["expected_clients_per_round"] == 6.0
    assert privacy["epsilon_after_all_rounds"] == eps[-1]
    assert "SampledWithoutReplacementDpEvent" in privacy["dp_event"]


@pytest.mark.slow
def test_every_runtime_gives_the_same_private_bits(
    tmp_path: Path, private_run: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    layouts = {
        "workers1": ["--workers", "1"],
        "workers2": ["--workers", "2"],
        "thread": ["--runtime", "thread"],
        "serial": ["--runtime", "serial"],
    }
    for name, flags in layouts.items():
        _run(tmp_path / name, *DP, *flags)
        assert model_bytes(tmp_path / name) == model_bytes(private_run), name
    _run(tmp_path / "plain")
    assert model_bytes(tmp_path / "plain") != model_bytes(private_run)
    # The noise is the run's: another seed of the noise source, another model.
    _run(tmp_path / "os", *DP, "--dp-noise-source", "os")
    assert model_bytes(tmp_path / "os") != model_bytes(private_run)


@pytest.mark.slow
def test_a_resumed_private_run_gives_the_same_bits_and_epsilon(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    flags = ["--dp", "adaptive", "--noise-multiplier", "0.9", "--sampler", "poisson"]
    _run(tmp_path / "whole", *flags, "--workers", "1")
    cut = tmp_path / "cut"
    killed = emberfl(
        *COMMAND, *flags, "--workers", "1", "--checkpoint-every", "2", "--out", str(cut),
        crash="checkpoint.latest:1",
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    resumed = emberfl("resume", str(cut), "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert model_bytes(cut) == model_bytes(tmp_path / "whole")
    whole, again = read_metrics(tmp_path / "whole"), read_metrics(cut)
    for column in ("epsilon", "clip_norm", "accuracy"):
        assert again[column].tolist() == whole[column].tolist(), column
    # Adaptive clipping moved the clip norm from its start.
    assert len(set(whole["clip_norm"].tolist())) == 4


@pytest.mark.slow
def test_the_budget_stops_the_run_or_calibrates_the_noise(tmp_path: Path) -> None:
    acc = ClientAccountant("poisson", 20, 0.3)
    stop = ["--dp", "central", "--noise-multiplier", "1.0", "--sampler", "poisson"]
    target = acc.epsilon(1.0, 2, 1e-5) * 1.001  # two rounds fit, the third would not
    _run(tmp_path / "stop", *stop, "--target-epsilon", str(target), "--dp-budget", "stop")
    metrics = read_metrics(tmp_path / "stop")
    assert metrics["round"].tolist() == [1, 2]
    assert metrics["epsilon"].tolist()[-1] <= target
    _run(tmp_path / "cal", "--dp", "local", "--target-epsilon", "8")
    metrics = read_metrics(tmp_path / "cal")
    assert metrics["round"].tolist() == [1, 2, 3, 4]
    assert 7.9 < metrics["epsilon"].tolist()[-1] <= 8.0


@pytest.mark.slow
def test_a_poisson_round_without_clients_still_releases_noise(tmp_path: Path) -> None:
    # 20 clients at q = 0.05: a round draws none now and then.
    flags = ["--dp", "central", "--noise-multiplier", "1.0", "--sampler", "poisson"]
    done = emberfl(
        "run", "--clients", "20", "--sample-ratio", "0.05", "--rounds", "6", "--epochs", "1",
        "--seed", "0", "--runtime", "serial", "--no-progress", "--quiet", *flags,
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = read_metrics(tmp_path / "run")
    clients = metrics["num_clients"].tolist()
    assert 0 in clients and metrics["round"].tolist() == [1, 2, 3, 4, 5, 6]
    losses = metrics["loss"].tolist()
    # The noise moved the model in every round no client trained.
    empty = [i for i, n in enumerate(clients) if n == 0 and i > 0]
    assert empty, clients
    for i in empty:
        assert losses[i] != losses[i - 1], (i, clients, losses)


# -- sample-level DP-SGD (Opacus) ----------------------------------------------------------


def test_dp_sgd_clips_each_samples_gradient_and_adds_the_clients_stream() -> None:
    pytest.importorskip("opacus", reason="opacus is not installed")
    from torch import nn
    from torch.nn import functional as F

    from emberfl.contrib.fedavg import FedAvgClientUpdate, LocalRun
    from emberfl.contrib.privacy.dpsgd import SampleLevelDPClientUpdate
    from emberfl.contrib.privacy.noise import NoiseStream

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    x, y = torch.randn(5, 3) * 4, torch.tensor([0, 1, 1, 0, 1])
    clip, z = 0.7, 0.9
    payload = _payload(torch.zeros(1), clip=clip, noise_multiplier=z, noise_seed=11, round=4)
    run = LocalRun(8, model, payload, torch.device("cpu"), 0.1, None, {})
    # The per-sample gradients, one backward pass each.
    per_sample = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_sample.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    step = SampleLevelDPClientUpdate(FedAvgClientUpdate())
    step.begin(run)
    hook = step.after_backward(run)
    assert hook is not None
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    hook()
    stream = NoiseStream(11, 4, Purpose.SAMPLE, 8)
    for k, p in enumerate(model.parameters()):
        norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) for grads in per_sample]
        clipped = sum(
            grads[k] * min(1.0, clip / (n + 1e-6))
            for grads, n in zip(per_sample, norms, strict=True)
        )
        noise = stream.draw(p.numel()).reshape(p.shape).float()
        torch.testing.assert_close(p.grad, (clipped + z * clip * noise) / 5, rtol=1e-5, atol=1e-6)
    assert max(norms) > clip  # some samples were clipped, so the test tells
    package = FedAvgUplinkPackage(cid=8, model_parameters=torch.zeros(1), data_size=5)
    assert step.finish(run, package, 1) is package
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone


def test_dp_sgd_refuses_batch_norm_and_the_batched_runtime() -> None:
    pytest.importorskip("opacus", reason="opacus is not installed")
    from torch import nn

    from emberfl.contrib.fedavg import FedAvgClientUpdate, LocalRun
    from emberfl.contrib.privacy.dpsgd import SampleLevelDPClientUpdate

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    run = LocalRun(0, model, _payload(torch.zeros(1)), torch.device("cpu"), 0.1, None, {})
    with pytest.raises(ValueError, match="BatchNorm"):
        SampleLevelDPClientUpdate(FedAvgClientUpdate()).begin(run)
    with pytest.raises(ConfigError, match="per-sample"):
        SimulationConfig(dp="sample", noise_multiplier=1.0, runtime="batched").validate()


def test_sample_level_epsilon_is_opacus_for_the_worst_client() -> None:
    pytest.importorskip("opacus", reason="opacus is not installed")
    from opacus.accountants import RDPAccountant

    from emberfl.contrib.privacy.dpsgd import calibrate_sample, sample_epsilon

    sizes, times = [10, 40, 40, 7], [3, 5, 0, 1]
    mine = sample_epsilon(1.2, sizes, times, 5, 2, 1e-5)
    theirs = []
    for n, t in zip(sizes, times, strict=True):
        if t:
            acc = RDPAccountant()
            acc.history = [(1.2, min(1.0, 5 / n), 2 * math.ceil(n / 5) * t)]
            theirs.append(acc.get_epsilon(1e-5))
    assert mine == max(theirs)
    assert sample_epsilon(1.2, sizes, [0] * 4, 5, 2, 1e-5) == 0.0
    z = calibrate_sample(3.0, 1e-5, sizes, 5, 2, rounds=6)
    assert sample_epsilon(z, sizes, [6] * 4, 5, 2, 1e-5) <= 3.0
    assert sample_epsilon(z * 0.97, sizes, [6] * 4, 5, 2, 1e-5) > 3.0


@pytest.mark.slow
def test_dp_sgd_runs_give_the_same_bits_on_every_runtime(
    tmp_path: Path, model_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    pytest.importorskip("opacus", reason="opacus is not installed")
    flags = ["--dp", "sample", "--clip", "1.0", "--target-epsilon", "20", "--rounds", "2"]
    models = {}
    layouts = {
        "default": [],
        "workers2": ["--workers", "2"],
        "thread": ["--runtime", "thread"],
        "serial": ["--runtime", "serial"],
    }
    for name, extra in layouts.items():
        _run(tmp_path / name, *flags, *extra)
        models[name] = model_bytes(tmp_path / name)
    assert all(m == models["serial"] for m in models.values())
    metrics = read_metrics(tmp_path / "serial")
    assert 0 < metrics["epsilon"].tolist()[-1] <= 20


def _readme_privacy_commands() -> list[str]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Differential privacy", 1)[1].split("```bash", 1)[1]
    block = section.split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("command", _readme_privacy_commands())
def test_the_readme_privacy_commands_run_as_written(tmp_path: Path, command: str) -> None:
    pytest.importorskip("opacus", reason="opacus is not installed")
    words = command.split()
    assert words[:2] == ["emberfl", "run"], command
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", CRASH_ENV)}
    done = subprocess.run(
        [sys.executable, "-m", "emberfl", *words[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the default run directory, runs/<timestamp>-..., lands here
        timeout=600,
        check=False,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = read_metrics(run_dir)
    assert metrics["round"].tolist()[-1] == 40  # the default rounds
    assert 0 < metrics["epsilon"].tolist()[-1] < math.inf
