"""Issue 21, the pure parts: which layers a transfer copies or re-initialises, which architectures
run on which images, and the finetune-from-weights protocols' arithmetic.  No Caffe runs here."""

from pathlib import Path

import pytest
from conftest import TABLE_A2, TABLE_A4
from test_finetune import schedules

from metaqnn.config import build_config
from metaqnn.export import dataset_sizes
from metaqnn.lrschedule import RateSchedule
from metaqnn.netspec import build_net
from metaqnn.render import render_net
from metaqnn.solverspec import load_protocol, solver_fields
from metaqnn.train import FROM_WEIGHTS, default_protocol, target_layers
from metaqnn.weight_plan import REINIT_SUFFIX, WeightsMismatchError, plan_weights, renamed_spec
from qagent.arch import parse_architecture
from qagent.space import size_problem


def spec(arch: str, size: int, channels: int, classes: int):
    layers = target_layers(parse_architecture(arch), classes)
    return build_net(layers, image_size=size, channels=channels, num_classes=classes, train_source="a", test_source="b")


def shapes(net) -> dict:
    return {name: list(info.shapes) for name, info in net.params.items()}


def plan(arch: str, source: tuple, target: tuple):
    return plan_weights(spec(arch, *target), shapes(spec(arch, *source)))


def test_same_data_copies_everything():
    arch = "[C(16,3,1), P(2,2), FC(32), SM(10)]"
    p = plan(arch, (8, 1, 10), (8, 1, 10))
    assert p.copied == ("Convolution1", "InnerProduct1", "InnerProduct2") and p.reinitialised == ()


def test_another_class_count_reinitialises_only_the_classifier():
    p = plan("[C(16,3,1), P(2,2), FC(32), SM(10)]", (8, 1, 10), (8, 1, 5))
    assert p.copied == ("Convolution1", "InnerProduct1")
    assert [(r.layer, r.reason) for r in p.reinitialised] == [("InnerProduct2", "classes 10 -> 5")]


def test_the_gap_blocks_class_convolution_is_reinitialised_with_the_classifier():
    p = plan("[C(16,3,1), P(2,2), C(16,3,1), GAP, SM(10)]", (8, 1, 10), (8, 1, 5))
    assert p.copied == ("Convolution1", "Convolution2")
    assert [r.layer for r in p.reinitialised] == ["Convolution3", "InnerProduct1"]
    assert {r.reason for r in p.reinitialised} == {"classes 10 -> 5"}


def test_cifar10_to_mnist_reinitialises_the_first_convolution_and_what_a_smaller_map_feeds():
    """The documented decision (docs/deviations.md): each dataset at its own shape; what no longer fits is new."""
    arch = "[C(64,3,1), C(128,3,1), P(5,3), C(256,3,1), P(3,2), FC(512), FC(128), SM(10)]"  # Table A2 #5
    p = plan(arch, (32, 3, 10), (28, 1, 10))
    reasons = {r.layer: r.reason for r in p.reinitialised}
    # 32 -> P(5,3) -> 10 -> P(3,2) -> 5, and 28 -> 9 -> 4: the first FC is fed 5x5x256 on CIFAR-10, 4x4x256 on MNIST
    assert reasons == {"Convolution1": "input channels 3 -> 1", "InnerProduct1": "input size 6400 -> 4096"}
    assert "Convolution2" in p.copied and "InnerProduct3" in p.copied  # classes unchanged: the classifier is kept


def test_table_a2_best_network_keeps_its_classifier_on_mnist():
    """32 -> 10 -> 5 and 28 -> 9 -> 5: the classifier of Table A2's best net is fed 5x5x512 on both."""
    p = plan(TABLE_A2[0][0], (32, 3, 10), (28, 1, 10))
    assert [(r.layer, r.reason) for r in p.reinitialised] == [("Convolution1", "input channels 3 -> 1")]
    assert p.copied == (*(f"Convolution{i}" for i in range(2, 7)), "InnerProduct1")


@pytest.mark.parametrize(
    "weights_arch, fragment",
    [
        ("[C(32,3,1), P(2,2), FC(32), SM(10)]", "blob 0 is 32x1x3x3 in the weights but 16x1x3x3"),
        ("[C(16,3,1), P(2,2), SM(10)]", "layer InnerProduct1 blob 0 is 10x256 in the weights but 32x256"),
        ("[P(2,2), FC(32), SM(10)]", "no layer Convolution1"),
        ("[C(16,3,1), C(16,3,1), P(2,2), FC(32), SM(10)]", "hold layer Convolution2"),
        ("[C(16,5,1), P(2,2), FC(32), SM(10)]", "16x1x5x5 in the weights"),
    ],
)
def test_weights_of_another_architecture_are_refused(weights_arch, fragment):
    target = spec("[C(16,3,1), P(2,2), FC(32), SM(10)]", 8, 1, 5)
    with pytest.raises(WeightsMismatchError, match=fragment.replace("(", r"\(")):
        plan_weights(target, shapes(spec(weights_arch, 8, 1, 10)))


def test_renamed_layers_are_skipped_by_name_and_learn_at_their_own_rate():
    target = spec("[C(16,3,1), P(2,2), FC(32), SM(10)]", 8, 1, 5)
    p = plan_weights(target, shapes(spec("[C(16,3,1), P(2,2), FC(32), SM(10)]", 8, 1, 10)))
    text = render_net(renamed_spec(target, p, 10.0))
    assert f'name: "InnerProduct2{REINIT_SUFFIX}"' in text and 'name: "InnerProduct2"' not in text
    assert text.count("lr_mult: 10.0") == 2  # weights and bias of the one renamed layer
    assert 'top: "InnerProduct2"' in text  # the blob keeps its name: nothing downstream changes
    assert "lr_mult" not in render_net(target)  # every other net renders as before


def test_size_problems_name_the_layer_and_the_reason():
    digits = build_config("digits").space
    mnist_arch = parse_architecture("[C(240,7,1), P(3,2), C(120,5,2), FC(50), SM(10)]")  # Table A4 #3
    reason = size_problem(digits, mnist_arch)
    assert reason is not None and reason.startswith("layer 3 (C(120,5,2)) on 8x8 images: receptive field 5")
    assert size_problem(build_config("mnist").space, mnist_arch) is None
    fc = parse_architecture("[C(64,3,1), FC(512), SM(10)]")
    assert "an FC layer is fed a 32x32 map" in str(size_problem(build_config("cifar10").space, fc))
    for arch, _ in TABLE_A2:  # Table 5: the CIFAR-10 top models run on SVHN's and MNIST's images
        for preset in ("cifar10", "svhn", "mnist"):
            assert size_problem(build_config(preset).space, parse_architecture(arch)) is None, (arch, preset)
    for arch, _ in TABLE_A4:
        assert size_problem(build_config("mnist").space, parse_architecture(arch)) is None, arch


BASES = ["finetune_cifar10", "finetune_svhn", "finetune_mnist", "finetune_digits"]


@pytest.mark.parametrize("base", BASES)
def test_from_weights_protocols_are_their_targets_at_a_tenth_of_the_rate(base):
    """Same epochs, same boundaries, every rate /10; the re-initialised layers at lr_mult 10 learn at the base rate."""
    scratch, tuned = load_protocol(base), load_protocol(base + FROM_WEIGHTS)
    assert tuned.reinit_lr_mult == 10.0 and scratch.reinit_lr_mult == 1.0
    assert tuned.base_lr * tuned.reinit_lr_mult == pytest.approx(scratch.base_lr)
    preset = base.split("_", 1)[1]
    sizes = dataset_sizes(build_config(preset), Path("/nonexistent"))
    a, b = (
        RateSchedule.from_fields(
            solver_fields(p, net="n", train_size=sizes[p.train_set], test_size=sizes[p.test_set], whole_test_set=False)
        )
        for p in (scratch, tuned)
    )
    assert (b.iters_per_epoch, b.max_iter, b.step_points()) == (a.iters_per_epoch, a.max_iter, a.step_points())
    for it in sorted({0, *a.step_points(), a.max_iter - 1}):
        assert b.rate(it) == pytest.approx(a.rate(it) / 10, rel=1e-9), it
    pinned, _ = schedules(preset)[1], None
    assert (pinned.max_iter, pinned.step_points()) == (b.max_iter, b.step_points())  # the pinned arithmetic holds


@pytest.mark.parametrize("preset", ["cifar10", "svhn", "mnist", "digits"])
def test_each_target_has_both_default_protocols(preset):
    cfg = build_config(preset)
    assert default_protocol(cfg, "scratch") == cfg.protocol.finetune
    assert load_protocol(default_protocol(cfg, "finetune")).reinit_lr_mult == 10.0


def test_table_a2_best_network_parameter_count_beside_the_papers():
    """docs/deviations.md records these beside the paper's 11.26M: the net Caffe builds for each target."""
    arch, paper = TABLE_A2[0]
    counts = {
        (size, channels, classes): spec(arch, size, channels, classes).param_count
        for size, channels, classes in ((32, 3, 10), (32, 3, 100), (28, 1, 10))
    }
    assert counts == {(32, 3, 10): 11_309_834, (32, 3, 100): 12_461_924, (28, 1, 10): 11_284_234}
    assert abs(counts[(32, 3, 10)] / 1e6 - paper) / paper < 0.005


def test_the_test_pass_sees_every_test_image_once():
    from metaqnn.train import whole_set_batch

    assert [whole_set_batch(n, 100) for n in (10000, 26032, 149, 300, 50, 7)] == [100, 16, 1, 100, 50, 7]


def build_for(arch: str):
    return lambda shape: spec(arch, *shape)


def test_the_data_weights_were_trained_on_is_found_from_their_shapes():
    from metaqnn.weight_plan import fit_source

    arch = "[C(8,3,1), P(5,3), C(8,3,1), P(3,2), FC(16), SM(10)]"
    _, shape = fit_source(build_for(arch), shapes(spec(arch, 32, 3, 10)), [(28, 1, 10)])
    assert shape[1:] == (3, 10) and spec(arch, *shape).params["InnerProduct1"].shapes[0] == (16, 200)
    _, exact = fit_source(build_for(arch), shapes(spec(arch, 32, 3, 10)), [(32, 3, 10), (28, 1, 10)])
    assert exact == (32, 3, 10)  # the source's known data is tried first


def test_weights_that_fit_the_architecture_on_no_input_are_another_architectures():
    from metaqnn.weight_plan import fit_source

    target = "[C(16,3,1), P(2,2), FC(32), SM(10)]"
    for other in ("[C(32,3,1), P(2,2), FC(32), SM(10)]", "[C(16,3,1), FC(32), FC(32), SM(10)]"):
        with pytest.raises(WeightsMismatchError, match="belong to another architecture"):
            fit_source(build_for(target), shapes(spec(other, 8, 1, 10)), [(8, 1, 10)])
    with pytest.raises(WeightsMismatchError, match="no learned layer"):
        fit_source(build_for(target), {}, [(8, 1, 10)])
