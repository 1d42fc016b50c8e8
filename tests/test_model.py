"""The two-block conditional UNet: shapes, labels, and the embedding shortcut."""
import torch

import ddpm
import utils


def make(T=10, **kw):
    d = utils.Diffusion(T)
    return ddpm.TwoPixelUNet(ddpm.TwoPixelUNetConfig(T=T, **kw), d.alphas_cumprod)


def test_output_shapes_with_and_without_labels():
    torch.manual_seed(0)
    m = make()
    x = torch.randn(7, 1, 2)
    t = torch.randint(0, 10, (7,))
    assert m(x, t, torch.tensor([0, 1, -1, 0, 1, 1, 0])).shape == (7, 1, 2)
    assert m(x, t, None).shape == (7, 1, 2)


def test_block_shapes_follow_the_handout():
    m = make(channels=(8, 32))
    assert m.conv1.kernel_size == (2,) and m.conv2.kernel_size == (1,)
    assert m.tconv2.kernel_size == (1,) and m.tconv1.kernel_size == (2,)
    assert (m.norm1.num_groups, m.norm2.num_groups, m.norm3.num_groups) == (4, 32, 4)
    h1 = m.conv1(torch.zeros(3, 1, 2))
    assert h1.shape == (3, 8, 1)
    assert m.conv2(h1).shape == (3, 32, 1)
    assert m.tconv1(torch.zeros(3, 16, 1)).shape == (3, 1, 2)


def test_null_label_is_the_unlabelled_input_and_labels_matter():
    torch.manual_seed(0)
    m = make()
    x = torch.randn(4, 1, 2)
    t = torch.tensor([0, 3, 5, 9])
    null = torch.full((4,), utils.NULL_LABEL)
    assert torch.allclose(m(x, t, null), m(x, t, None))
    with torch.no_grad():
        m.embed.class_proj.weight.normal_()
    assert not torch.allclose(m(x, t, torch.zeros(4, dtype=torch.int64)), m(x, t, torch.ones(4, dtype=torch.int64)))


def test_embedding_shortcut_equals_direct_computation():
    torch.manual_seed(0)
    m = make(T=50)
    t = torch.randint(0, 50, (300,))
    y = torch.randint(-1, 2, (300,))
    emb = m.embed(t, y)
    direct = [dense(emb) for dense in (m.dense1, m.dense2, m.dense3)]
    for a, b in zip(m.embeddings(t, y), direct):
        assert torch.allclose(a, b, atol=1e-6)


def test_config_round_trip_rebuilds_the_same_network():
    torch.manual_seed(0)
    m = make(channels=(8, 32))
    d = utils.Diffusion(10)
    m2 = ddpm.build_model(ddpm.config_to_dict(m.config), d.alphas_cumprod)
    m2.load_state_dict(m.state_dict())
    x, t = torch.randn(5, 1, 2), torch.randint(0, 10, (5,))
    assert torch.equal(m(x, t), m2(x, t))


def test_forward_is_the_layers_called_as_convolutions():
    torch.manual_seed(0)
    m = make(T=50)
    for p in m.parameters():  # every weight away from its initialisation, the bias included
        p.data.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(64, 1, 2), torch.randint(0, 50, (64,)), torch.randint(-1, 2, (64,))
    e1, e2, e3 = (e[..., None] for e in m.embeddings(t, y))  # (B, C, 1), as the layers' outputs
    h = ddpm.precondition(x, m.alphas_cumprod[t][:, None, None], m.config.data_mean, m.config.data_std)
    h1 = m.act(m.norm1(m.conv1(h) + e1))
    h2 = m.act(m.norm2(m.conv2(h1) + e2))
    h = m.act(m.norm3(m.tconv2(h2) + e3))
    assert torch.allclose(m(x, t, y), m.tconv1(torch.cat([h, h1], dim=1)), atol=1e-5)
