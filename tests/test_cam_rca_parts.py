"""RCA building blocks: contrast loss vs a brute-force loop, memory bank writes, k-means prototypes,
aggregation shapes and gradients, region masks, the CAM network with every part switched on/off."""
import math

import pytest
import torch
import torch.nn.functional as F

from rca_core.config.cam import CamConfig
from rca_core.kmeans import class_prototypes, kmeans
from rca_core.losses.contrast import semantic_contrast_loss
from rca_core.memory_bank import RegionMemory
from rca_core.models.aggregation import SemanticAggregation
from rca_core.models.cam_net import CamNet
from rca_core.models.projection import region_embeddings, region_masks


def brute_force(anchors, acls, mem, mcls, tau):
    total, n = 0.0, 0
    for u, c in zip(anchors, acls.tolist()):
        u = u / u.norm()
        pos = [m for m, k in zip(mem, mcls.tolist()) if k == c]
        neg = [m for m, k in zip(mem, mcls.tolist()) if k != c]
        if not pos:
            continue
        terms = []
        for p in pos:
            num = math.exp(float(u @ p) / tau)
            den = num + sum(math.exp(float(u @ q) / tau) for q in neg)
            terms.append(-math.log(num / den))
        total += sum(terms) / len(terms)
        n += 1
    return total / n


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_contrast_equals_brute_force(tau):
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(6, 8, generator=g, dtype=torch.float64)
    acls = torch.tensor([0, 1, 2, 0, 3, 1])  # class 3 has no positive in the memory: skipped
    mem = F.normalize(torch.randn(11, 8, generator=g, dtype=torch.float64), dim=1)
    mcls = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 4, 4, 1])
    got = semantic_contrast_loss(anchors, acls, mem, mcls, tau)
    assert abs(float(got) - brute_force(anchors, acls, mem, mcls, tau)) < 1e-9


def test_contrast_gradient_and_empty_cases():
    a = torch.randn(3, 4, requires_grad=True)
    mem = F.normalize(torch.randn(5, 4), dim=1)
    loss = semantic_contrast_loss(a, torch.tensor([0, 1, 1]), mem, torch.tensor([0, 1, 0, 1, 2]))
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # empty memory or no anchor with a positive -> zero loss that still backpropagates
    z = semantic_contrast_loss(a, torch.tensor([0, 1, 1]), mem[:0], torch.zeros(0, dtype=torch.long))
    assert float(z.detach()) == 0.0 and z.requires_grad
    z = semantic_contrast_loss(a, torch.tensor([3, 3, 3]), mem, torch.tensor([0, 1, 0, 1, 2]))
    assert float(z.detach()) == 0.0


def test_contrast_mixup_is_finite_and_lower_for_aligned_anchor():
    mem = torch.eye(4)
    mcls = torch.tensor([0, 1, 2, 3])
    good = semantic_contrast_loss(torch.eye(4) * 5, mcls, mem, mcls, 0.1)
    bad = semantic_contrast_loss(torch.eye(4).roll(1, 0), mcls, mem, mcls, 0.1)
    assert float(good) < float(bad)
    mixed = semantic_contrast_loss(torch.eye(4), mcls, mem, mcls, 0.1, mixup_alpha=8.0,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(mixed)


def test_memory_respects_threshold_and_bound():
    mem = RegionMemory(num_classes=3, size=4, dim=5, score_threshold=0.7)
    emb = torch.randn(10, 5)
    cls = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.71, 0.99, 0.75, 0.69, 0.7, 0.1, 0.2])
    n = mem.write_regions(emb, cls, scores)
    assert n == 6  # 0.69, 0.7 (not strictly above), 0.1, 0.2 are refused
    assert mem.count.tolist() == [4, 0, 0] and mem.writes.tolist() == [6, 0, 0]
    e, lab = mem.entries()
    assert e.shape == (4, 5) and lab.tolist() == [0, 0, 0, 0]
    # FIFO: the queue holds the last 4 accepted writes (rows 2, 3, 4, 5), normalised
    expect = F.normalize(emb[[2, 3, 4, 5]], dim=1)
    assert torch.allclose(torch.sort(e, 0).values, torch.sort(expect, 0).values)
    assert torch.allclose(e.norm(dim=1), torch.ones(4))
    assert not e.requires_grad
    with pytest.raises(ValueError):
        mem.push(torch.randn(1, 5), torch.tensor([3]))


def test_prototypes_come_from_stored_embeddings():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    pts = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centres])
    got = kmeans(pts, 3, seed=0)
    # every true centre is matched by one found centre
    assert torch.cdist(centres, got).min(1).values.max() < 0.2
    labels = torch.tensor([0] * 40 + [1] * 20)
    protos, valid = class_prototypes(pts, labels, num_classes=3, k=2)
    assert valid.tolist() == [[True, True], [True, True], [False, False]]
    assert torch.cdist(centres[:2], protos[0]).min(1).values.max() < 0.2   # class 0 = first two clusters
    assert torch.cdist(centres[2:], protos[1]).min().item() < 0.2
    # fewer embeddings than K: they are the prototypes
    protos, valid = class_prototypes(pts[:1], torch.tensor([1]), num_classes=2, k=3)
    assert valid.tolist() == [[False] * 3, [True, False, False]] and torch.equal(protos[1, 0], pts[0])


def test_model_prototypes_from_memory():
    cfg = CamConfig.model_validate({"backbone": {"name": "small", "width": 8},
                                    "memory": {"size": 6, "dim": 8}, "aggregation": {"prototypes_per_class": 2}})
    net = CamNet(cfg, num_classes=3)
    net.memory.push(torch.randn(7, 8), torch.tensor([0, 0, 0, 0, 0, 1, 0]))
    assert net.refresh_prototypes() == 3  # class 0: 2 centres, class 1: its single embedding
    e1 = net.memory.class_entries(1)
    assert torch.allclose(net.prototypes[2], e1[0]) and net.prototype_valid.tolist() == [True, True, True, False]
    # class-0 prototypes are means of class-0 entries: they lie in the span (convex hull) of them
    e0 = net.memory.class_entries(0)
    sol = torch.linalg.lstsq(e0.t(), net.prototypes[:2].t()).solution
    assert torch.allclose(e0.t() @ sol, net.prototypes[:2].t(), atol=1e-4)


@pytest.mark.parametrize("softmax", [True, False])
def test_aggregation_shapes_and_gradients(softmax):
    agg = SemanticAggregation(in_channels=6, dim=4, softmax=softmax)
    torch.nn.init.normal_(agg.fuse.weight)  # leave the identity start so every part gets a gradient
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    protos = torch.randn(9, 4)
    valid = torch.tensor([True] * 7 + [False] * 2)
    y = agg(x, protos, valid)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in agg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # invalid prototypes do not matter; no valid prototype -> no context
    protos2 = protos.clone()
    protos2[7:] = 100.0
    assert torch.allclose(agg.attend(x, protos, valid), agg.attend(x, protos2, valid))
    assert agg.attend(x, protos, torch.zeros(9, dtype=torch.bool)).abs().sum() == 0


def test_aggregation_identity_start():
    agg = SemanticAggregation(in_channels=6, dim=4)
    x = torch.randn(1, 6, 3, 3)
    assert torch.allclose(agg(x, torch.randn(5, 4)), x)


def test_aggregation_default_fusion_init_uses_the_context_from_the_start():
    torch.manual_seed(0)
    agg = SemanticAggregation(in_channels=6, dim=4, fusion_init="default")
    x = torch.randn(1, 6, 3, 3)
    protos = torch.randn(5, 4)
    assert agg.fuse.weight[:, 6:].abs().sum() > 0
    # the prototypes change the output: the context path is live at step 0
    assert not torch.allclose(agg(x, protos), agg(x, protos + 1.0))
    with pytest.raises(ValueError, match="fusion_init"):
        SemanticAggregation(in_channels=6, dim=4, fusion_init="zeros")


def test_region_masks_and_embeddings():
    cam = torch.zeros(2, 3, 4, 4)
    cam[0, 0, :2] = 5.0   # class 0 strong in the top half of image 0
    cam[1, 2, :, :1] = 5.0
    tags = torch.tensor([[1, 0, 0], [0, 1, 1]])
    masks, index = region_masks(cam, tags)
    assert index.tolist() == [[0, 0], [1, 1], [1, 2]]
    assert masks[0, :2].all() and not masks[0, 2:].any()
    assert masks[2, :, 0].all() and not masks[2, :, 1:].any()
    assert masks[1].sum() > 0  # a weak class still gets a non-empty region
    emb = torch.arange(2 * 2 * 16, dtype=torch.float32).reshape(2, 2, 4, 4)
    r = region_embeddings(emb, masks, index)
    assert r.shape == (3, 2) and torch.allclose(r[0], emb[0][:, :2].mean(dim=(1, 2)))


@pytest.mark.parametrize("parts", [(False, False, False), (True, True, False), (True, False, True), (True, True, True)])
def test_cam_net_parts_switch(parts):
    mem, con, agg = parts
    cfg = CamConfig.model_validate({"backbone": {"name": "small", "width": 8, "output_stride": 8}, "memory": {"enabled": mem, "dim": 8, "size": 4},
                                    "contrast": {"enabled": con}, "aggregation": {"enabled": agg, "prototypes_per_class": 2}})
    net = CamNet(cfg, num_classes=4)
    out = net(torch.randn(2, 3, 32, 32), with_embeddings=True)
    assert out["cam"].shape == (2, 3, 4, 4) and out["logits"].shape == (2, 3)
    assert ("emb_hidden" in out) == mem and hasattr(net, "aggregation") == agg
    if not agg:
        assert out["cam"] is out["cam_plain"]
    names = set(net.state_dict())
    assert ("memory.queue" in names) == mem and ("prototypes" in names) == agg


def test_config_refuses_inconsistent_parts():
    with pytest.raises(ValueError, match="contrast.enabled needs cam.memory.enabled"):
        CamConfig.model_validate({"memory": {"enabled": False}, "aggregation": {"enabled": False}})
    with pytest.raises(ValueError, match="aux_weight"):
        CamConfig.model_validate({"train": {"aux_weight": 0}})


def test_folded_heads_equal_the_layers_run_in_turn():
    """The aggregated CAM (fusion, output and classifier 1x1 convs folded into one product) and the region
    embeddings (the projection head's last 3x3 conv applied to region averages) equal the layers run over every
    pixel, in value and in every parameter's gradient."""
    torch.manual_seed(0)
    cfg = CamConfig.model_validate({"backbone": {"name": "small", "width": 8, "output_stride": 8},
                                    "memory": {"enabled": True, "dim": 8, "size": 4}, "contrast": {"enabled": True},
                                    "aggregation": {"enabled": True, "prototypes_per_class": 2,
                                                    "fusion_init": "default"}})
    net = CamNet(cfg, num_classes=4).double()
    with torch.no_grad():  # prototypes, one of them invalid
        net.set_prototypes(torch.randn(3, 2, 8, dtype=torch.float64), torch.tensor([[1, 1], [1, 0], [0, 1]]).bool())
    x = torch.randn(2, 3, 40, 48, dtype=torch.float64)
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float64)

    def folded():
        out = net(x, with_embeddings=True)
        masks, index = region_masks(out["cam_plain"], tags)
        return out["cam"], net.region_embeddings(out, masks, index)

    def in_turn():
        feat = net.backbone(x)
        cam = net.agg_classifier(net.aggregation(feat, net.prototypes, net.prototype_valid))
        masks, index = region_masks(net.classifier(feat), tags)
        return cam, region_embeddings(net.projection(feat), masks, index)

    grads = []
    for fn in (folded, in_turn):
        net.zero_grad()
        cam, emb = fn()
        (cam.square().mean() + emb.sin().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        grads[-1]["_values"] = torch.cat([cam.flatten(), emb.flatten()])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-10), k
