"""Images in: the preprocessing, the vision tower and the prompt with images, against transformers
5.17.0 on a tiny checkpoint it writes (conftest.vision_ckpt: a 2-layer tower of odd sizes); the
loader, the command line, the Python API and their refusals."""

import json

import numpy as np
import pytest
import torch

from conftest import IMAGE_TOKENS, TEST_PROCESSOR, copy_checkpoint, threads
from images import (ImageError, ImageSettings, image_patches, image_prompt, image_settings, place_images, read_image,
                    stack)
from conftest import assert_one_line_error, cli, in_process, single, torchrun
from kvcache import KVCache

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
TOL = 1e-4
SETTINGS = ImageSettings(**TEST_PROCESSOR, boi_token_id=300, image_token_id=301, eoi_token_id=302)
# (width, height, mode): a square, a wide, a tall, one smaller than the patch budget (upscaled),
# one too thin for a row of squares, a grey one and one with alpha
SIZES = [(64, 64, "RGB"), (200, 37, "RGB"), (30, 150, "RGB"), (10, 12, "RGB"), (400, 6, "RGB"), (33, 47, "L"),
         (52, 40, "RGBA")]


def picture(w, h, mode="RGB", seed=0):
    """A smooth random image (noise alone would hide a resampling mistake less well)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = [np.sin(xx / (3 + c) + g.uniform(0, 6)) * np.cos(yy / (4 + c)) for c in range(4)]
    arr = ((np.stack(base, -1) * 0.45 + 0.5) * 255 + g.normal(0, 8, (h, w, 4))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., :{"RGB": 3, "L": 1, "RGBA": 4}[mode]].squeeze(-1) if mode == "L"
                           else arr[..., :{"RGB": 3, "RGBA": 4}[mode]], mode)


def hf_processor(**kw):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    return Gemma4ImageProcessorPil(**{**TEST_PROCESSOR, **kw})


@pytest.mark.parametrize("w,h,mode", SIZES)
def test_patches_equal_transformers_processor(w, h, mode):
    im = picture(w, h, mode, seed=w)
    ref = hf_processor()(images=[im], return_tensors="pt")
    ours = image_patches(im.convert("RGB"), SETTINGS)
    assert ours.pixels.shape == ref["pixel_values"].shape[1:] and ours.pixels.dtype == torch.float32
    torch.testing.assert_close(ours.pixels, ref["pixel_values"][0], atol=1e-6, rtol=0)
    assert torch.equal(ours.places, ref["image_position_ids"][0].long())
    assert ours.n_soft == int(ref["num_soft_tokens_per_image"][0])
    real = int((ours.places[:, 0] >= 0).sum())
    assert real == ours.n_soft * 9 and (ours.pixels[real:] == 0).all()  # padding: zero patches at (-1, -1)


def test_patches_at_the_released_budget():
    im = picture(640, 427)
    ref = hf_processor(patch_size=16, max_soft_tokens=280)(images=[im], return_tensors="pt")
    ours = image_patches(im, ImageSettings())
    torch.testing.assert_close(ours.pixels, ref["pixel_values"][0], atol=1e-6, rtol=0)
    assert torch.equal(ours.places, ref["image_position_ids"][0].long())
    assert ours.n_soft == int(ref["num_soft_tokens_per_image"][0]) == 260 and ours.size == (624, 960)


def test_settings_read_from_the_checkpoint(vision_ckpt, tmp_path):
    path, _ = vision_ckpt
    from hfconfig import read_config
    assert image_settings(path, read_config(path)) == SETTINGS
    bare = copy_checkpoint(path, tmp_path / "c")
    (bare / "preprocessor_config.json").unlink()  # then config.json's vision_config: patch 4, k 3
    s = image_settings(bare, read_config(bare))
    assert (s.patch_size, s.pooling_kernel_size, s.image_token_id) == (4, 3, 301)


def test_image_features_equal_transformers(vision_ckpt):
    from checkpoint import load_vision
    path, hf = vision_ckpt
    ims = [image_patches(picture(w, h, seed=i).convert("RGB"), SETTINGS) for i, (w, h, _) in enumerate(SIZES[:4])]
    pixels, places = stack(ims)
    with torch.no_grad():
        ref = hf.model.encoder.get_image_features(pixels, places, return_dict=True).pooler_output
        ours = load_vision(path, "cpu", torch.float32)(pixels, places)
    assert ours.shape == (sum(p.n_soft for p in ims), 48)  # the text model's width
    print(f"image features max diff {(ours - ref).abs().max():.2e}")
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_place_images():
    ids = [2, 7, 301, 8, 301]
    assert place_images(ids, [2, 1], SETTINGS) == [2, 7, 300, 301, 301, 302, 8, 300, 301, 302]
    with pytest.raises(ImageError, match="has 0 places for an image .* 1 image was given: a raw prompt"):
        place_images([2, 7], [4], SETTINGS)
    with pytest.raises(ImageError, match="has 2 places .* 1 image was given"):
        place_images(ids, [4], SETTINGS)


def prompt_with_images(tok, ims, text="describe", seed=0):
    """A chat prompt with images before the text, placed as transformers' processor places them."""
    content = [{"type": "image"} for _ in ims] + [{"type": "text", "text": text}]
    ids = tok.apply_chat_template([{"role": "user", "content": content}])
    return place_images(ids, [p.n_soft for p in ims], SETTINGS)


def mm_types(ids):
    return torch.tensor([[int(t == IMAGE_TOKENS["<|image|>"]) for t in row] for row in ids])


def test_causal_logits_with_images_equal_transformers(vision_ckpt):
    """The causal pass over a prompt with two images (the bidirectional blocks longer than the sliding
    window of 24) equals transformers' encoder, with the masks its generate() builds."""
    from generate import load
    path, hf = vision_ckpt
    m, tok = load(path, "cpu", torch.float32)
    ims = [image_patches(picture(64, 64, seed=1), SETTINGS), image_patches(picture(30, 150, seed=2), SETTINGS)]
    ids = torch.tensor([prompt_with_images(tok, ims)])
    pixels, places = stack(ims)
    enc = hf.model.encoder
    with torch.no_grad():
        masks = enc.create_masks_for_generate(hf.config, torch.empty(1, ids.shape[1], 0), None, None,
                                              torch.arange(ids.shape[1])[None], mm_token_type_ids=mm_types(ids))
        out = enc(input_ids=ids, pixel_values=pixels, image_position_ids=places, attention_mask=masks)
        ref = torch.tanh(hf.lm_head(out.last_hidden_state).float() / 30.0) * 30.0
        causal_only = torch.tanh(hf.lm_head(enc(input_ids=ids, pixel_values=pixels, image_position_ids=places,
                                                attention_mask=None).last_hidden_state).float() / 30) * 30
        from checkpoint import load_vision
        soft = load_vision(path, "cpu", torch.float32)(pixels, places)
        cache = KVCache(m.config.layer_types, m.config.sliding_window)
        ours = m.logits(m.forward_causal(ids, cache, image_embeds=soft))
    assert ids.shape[1] > 2 * 24 and (ids == 301).sum() == soft.shape[0] == ims[0].n_soft + ims[1].n_soft
    print(f"causal logits with images max diff {(ours - ref).abs().max():.2e}")
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    assert (ours - causal_only).abs().max() > 1e-2  # the blocks really see both ways


def hf_generate_images(hf, rows, pixels, places, max_new_tokens, seed):
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):], mask[b, P - len(r):] = torch.tensor(r), 1
    torch.manual_seed(seed)
    extra = {"attention_mask": mask} if len(rows) > 1 else {}
    with threads(1):  # transformers' own tokens move with the thread count (conftest.threads)
        return hf.generate(ids, pixel_values=pixels, image_position_ids=places, mm_token_type_ids=mm_types(ids),
                           max_new_tokens=max_new_tokens, **extra).sequences


@pytest.mark.parametrize("n_images", [1, 2])
def test_generate_with_images_identical(vision_ckpt, n_images):
    from checkpoint import load_vision
    from generate import load, settings_for
    from sampler import block_diffusion
    path, hf = vision_ckpt
    m, tok = load(path, "cpu", torch.float32)
    vis = load_vision(path, "cpu", torch.float32)
    ims = [image_patches(picture(*wh, seed=9 + i), SETTINGS) for i, wh in enumerate([(50, 70), (120, 40)][:n_images])]
    row = prompt_with_images(tok, ims, "what is in the picture?")
    pixels, places = stack(ims)
    settings = settings_for(m, max_new_tokens=16)  # two canvases of 8
    torch.manual_seed(n_images)
    with torch.no_grad():
        result = block_diffusion(m, [row], settings, images=[vis(pixels, places)])
    ref = hf_generate_images(hf, [row], pixels, places, 16, n_images)
    assert torch.equal(result.sequences, ref), (result.sequences[:, len(row):], ref[:, len(row):])


def test_generate_with_images_identical_padded_batch(vision_ckpt):
    """A left-padded batch: one image in the first row, two in the second, one row without."""
    from checkpoint import load_vision
    from generate import load, settings_for
    from sampler import block_diffusion
    path, hf = vision_ckpt
    m, tok = load(path, "cpu", torch.float32)
    vis = load_vision(path, "cpu", torch.float32)
    per_row = [[image_patches(picture(40, 40, seed=3), SETTINGS)],
               [image_patches(picture(100, 30, seed=4), SETTINGS), image_patches(picture(20, 90, seed=5), SETTINGS)],
               []]
    rows = [prompt_with_images(tok, ims, text) for ims, text in zip(per_row, ["one", "two pictures, compare", "none"])]
    assert len({len(r) for r in rows}) == 3  # every row a different length: real padding
    every = [p for ims in per_row for p in ims]
    pixels, places = stack(every)
    with torch.no_grad():
        soft = [vis(*stack(ims)) if ims else None for ims in per_row]
        torch.manual_seed(21)
        result = block_diffusion(m, rows, settings_for(m, max_new_tokens=16), images=soft)
    ref = hf_generate_images(hf, rows, pixels, places, 16, 21)
    assert torch.equal(result.sequences, ref)


def png(tmp_path, name, w, h, seed=0):
    f = tmp_path / name
    picture(w, h, seed=seed).save(f)
    return f


def test_python_api_equals_transformers(vision_ckpt, tmp_path):
    """generate(..., images=[file]) with a seed: the text of transformers' generate on what its
    processor makes of the same file; the vision tower is read only then."""
    import generate
    from sampler import trim
    path, hf = vision_ckpt
    model, tok = generate.load(path, "cpu", torch.float32)
    text = generate.generate(model, tok, "the quick brown fox", max_new_tokens=16, seed=4)
    assert getattr(model, "vision", None) is None  # a text-only run reads no vision tensor
    f = png(tmp_path, "a.png", 90, 60, seed=8)
    out = generate.generate(model, tok, "the quick brown fox", images=[f], max_new_tokens=16, seed=4)
    assert model.vision is not None and out != text
    ids, patches = image_prompt(tok, "the quick brown fox", [f], SETTINGS, model.config, 16)
    ref = hf_generate_images(hf, [ids], *stack(patches), 16, 4)
    assert out == tok.decode(tok.split_thought(trim(ref[0, len(ids):].tolist(), generate.settings_for(model))).answer)
    two = generate.generate(model, tok, ["the quick brown fox", "jumps"], images=[[f], []], max_new_tokens=16, seed=4)
    assert two[0] == out  # per-prompt images; the text does not depend on the batch
    rgba = read_image(f).convert("RGBA")  # a PIL image of another mode is taken as RGB, as transformers does
    assert generate.generate(model, tok, "the quick brown fox", images=[rgba], max_new_tokens=16, seed=4) == out


@pytest.mark.slow
def test_command_line_with_images(vision_ckpt, tmp_path):
    import generate
    path, _ = vision_ckpt
    a, b = png(tmp_path, "a.png", 64, 40, seed=1), png(tmp_path, "b.jpg", 30, 70, seed=2)
    rc, out, err = cli("--model", path, "--image", a, "--image", b, "--max-new-tokens", 16, "--seed", 2,
                       "--device", "cpu", "compare them")
    assert rc == 0, err
    model, tok = generate.load(path, "cpu", torch.float32)
    assert out.rstrip("\n") == generate.generate(model, tok, "compare them", images=[a, b], max_new_tokens=16, seed=2)
    rc, out, err = cli("--model", path, "--image", a, "--print-prompt", "what is it")
    assert rc == 0 and out.count("<|image>") == 1 and out.count("<|image|>") == image_patches(read_image(a), SETTINGS).n_soft == 60 and "<image|>" in out, out
    assert "user: <|image>" in out  # the image before the text, where the chat template puts it
    rc, out, err = cli("--model", path, "--raw", "--image", a, "--image", a, "--print-prompt", "<|image|> vs <|image|>")
    assert rc == 0 and out.count("<|image>") == 2 and "vs" in out, out


@pytest.mark.slow
def test_bad_images_are_one_line(vision_ckpt, chat_free_ckpt, tmp_path):
    path, _ = vision_ckpt
    good = png(tmp_path, "ok.png", 64, 40)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    for args, code, needle in [
        (["--image", text, "hi"], 2, "not an image Pillow can read"),
        (["--image", cut, "hi"], 2, "cannot be decoded"),
        (["--image", tmp_path / "none.png", "hi"], 2, "does not exist"),
        (["--raw", "--image", good, "hi"], 2, "a raw prompt takes one <|image|>"),
        (["--raw", "--image", good, "<|image|> and <|image|>"], 2, "has 2 places"),
        (["--image", good, "--batch-file", good], 2, "not with --batch-file"),
    ]:
        rc, out, err = cli("--model", path, "--max-new-tokens", 8, *args)
        assert_one_line_error(rc, err, code, needle)
        assert out == ""
    rc, out, err = cli("--model", chat_free_ckpt, "--image", good, "hi")  # a stand-in tower, no image token
    assert_one_line_error(rc, err, 1, "image_token_id 258880 is not one of the model's 320 tokens", "cannot take images")
    rc, out, err = cli("--model", "weights-code", "--image", good, "hi")
    assert_one_line_error(rc, err, 1, "has no vision tower")
    short = copy_checkpoint(path, tmp_path / "short")  # 2 images of 70 soft tokens do not fit in 128 positions
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 128
    (short / "config.json").write_text(json.dumps(cfg))
    big = png(tmp_path, "big.png", 300, 300)
    rc, out, err = cli("--model", short, "--max-new-tokens", 8, "--image", big, "--image", big, "hi")
    assert_one_line_error(rc, err, 2, "the prompt with its 2 images has", "but the model has 128")


def test_read_image_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
    f = tmp_path / "rot.jpg"  # EXIF orientation 6: stored 40 wide, shown 40 tall, as transformers' load_image does
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(40, 20).save(f, exif=exif)
    assert read_image(f).size == (20, 40)


def test_saved_with_vision_loads_in_transformers(vision_ckpt, tmp_path):
    """A checkpoint written here with its tower: transformers reads it and gives the same image
    features and logits; read back here it is the same too."""
    from checkpoint import load_model, load_vision, save_checkpoint
    path, hf = vision_ckpt
    net, vis = load_model(path, "cpu", torch.float32), load_vision(path, "cpu", torch.float32)
    save_checkpoint(net, tmp_path / "ours", vision=vis)
    back = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ims = [image_patches(picture(70, 45, seed=3), SETTINGS)]
    pixels, places = stack(ims)
    ids = torch.tensor([[2, 5, 6, 300] + [301] * ims[0].n_soft + [302, 7, 8]])
    with torch.no_grad():
        f_ref = hf.model.encoder.get_image_features(pixels, places, return_dict=True).pooler_output
        f_back = back.model.encoder.get_image_features(pixels, places, return_dict=True).pooler_output
        masks = back.model.encoder.create_masks_for_generate(back.config, torch.empty(1, ids.shape[1], 0), None, None,
                                                             torch.arange(ids.shape[1])[None], mm_token_type_ids=mm_types(ids))
        h = back.model.encoder(input_ids=ids, pixel_values=pixels, image_position_ids=places,
                               attention_mask=masks).last_hidden_state
        ref = torch.tanh(back.lm_head(h).float() / 30) * 30
        cache = KVCache(net.config.layer_types, net.config.sliding_window)
        ours = net.logits(net.forward_causal(ids, cache, image_embeds=vis(pixels, places)))
        again = load_vision(tmp_path / "ours", "cpu", torch.float32)(pixels, places)
    torch.testing.assert_close(f_back, f_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    assert torch.equal(again, vis(pixels, places))


def test_quantize_keeps_the_tower(vision_ckpt, tmp_path):
    """quantize.py rewrites the experts only: the vision tensors are copied bit for bit."""
    from safetensors import safe_open
    from checkpoint import VISION_PREFIX, load_vision, weight_map
    from quantize import convert
    path, _ = vision_ckpt
    convert(path, tmp_path / "q", {"experts": "int8", "group_size": 16})
    src, dst = weight_map(path), weight_map(tmp_path / "q")
    names = [n for n in src if n.startswith(VISION_PREFIX + "vision_tower.") or n.startswith(VISION_PREFIX + "embed_vision.")]
    assert len(names) == 2 * 13 + 4 + 1
    for n in names:
        with safe_open(src[n], "pt") as a, safe_open(dst[n], "pt") as b:
            assert torch.equal(a.get_tensor(n), b.get_tensor(n)) and a.get_tensor(n).dtype == b.get_tensor(n).dtype
    assert (tmp_path / "q" / "preprocessor_config.json").is_file()
    ims = [image_patches(picture(40, 40), SETTINGS)]
    assert torch.equal(load_vision(tmp_path / "q", "cpu", torch.float32)(*stack(ims)),
                       load_vision(path, "cpu", torch.float32)(*stack(ims)))


def test_causal_images_when_the_config_says_so(vision_ckpt, tmp_path):
    """use_bidirectional_attention null: image tokens are read causally, like transformers does then."""
    from generate import load
    from checkpoint import load_vision
    path, _ = vision_ckpt
    plain = copy_checkpoint(path, tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["text_config"]["use_bidirectional_attention"] = None
    (plain / "config.json").write_text(json.dumps(cfg))
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(plain, dtype=torch.float32).eval()
    m, _ = load(plain, "cpu", torch.float32)
    assert m.config.bidirectional_images is False
    ims = [image_patches(picture(40, 60, seed=2), SETTINGS)]
    pixels, places = stack(ims)
    ids = torch.tensor([[2, 9, 300] + [301] * ims[0].n_soft + [302, 11]])
    with torch.no_grad():
        masks = hf.model.encoder.create_masks_for_generate(hf.config, torch.empty(1, ids.shape[1], 0), None, None,
                                                           torch.arange(ids.shape[1])[None], mm_token_type_ids=mm_types(ids))
        h = hf.model.encoder(input_ids=ids, pixel_values=pixels, image_position_ids=places, attention_mask=masks)
        ref = torch.tanh(hf.lm_head(h.last_hidden_state).float() / 30) * 30
        ours = m.logits(m.forward_causal(ids, KVCache(m.config.layer_types, m.config.sliding_window),
                                         image_embeds=load_vision(plain, "cpu", torch.float32)(pixels, places)))
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


@pytest.mark.slow
def test_serve_takes_image_parts(vision_ckpt, chat_free_ckpt, tmp_path):
    """OpenAI image_url parts with data: URLs: the reply is what generate() gives for the same image
    and seed, alone or beside a text-only request in one batch; bad parts are 400s naming them."""
    import base64
    import generate
    from conftest import Server
    pytest.importorskip("openai")
    path, _ = vision_ckpt
    f = png(tmp_path, "a.png", 80, 50, seed=6)
    url = "data:image/png;base64," + base64.b64encode(f.read_bytes()).decode()
    model, tok = generate.load(path, "cpu", torch.float32)
    want = generate.generate(model, tok, "what is it?", images=[f], max_new_tokens=16, seed=5)
    s = Server(path)
    try:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is it?"}]}]
        r = s.client().chat.completions.create(model="x", messages=msgs, max_tokens=16, seed=5)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(image_prompt_ids(tok, f))
        again = s.client().chat.completions.create(model="x", messages=msgs, max_tokens=16, seed=5)
        assert again.choices[0].message.content == want  # no prefix cache mix-up on a second, same request
        for part, needle in [({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "data: URL"),
                             ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
                             ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                              "not an image Pillow can read")]:
            status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                part, {"type": "text", "text": "hi"}]}], "max_tokens": 4})
            assert status == 400 and needle in body["error"]["message"], body
            assert body["error"]["param"] == "messages[0].content[0].image_url"
    finally:
        assert s.stop() == 0
    s = Server(chat_free_ckpt)
    try:
        status, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}], "max_tokens": 4})
        assert status == 400 and "cannot take images" in body["error"]["message"], body
    finally:
        s.stop()


@pytest.mark.slow
def test_batcher_runs_image_and_text_requests_together(vision_ckpt, tmp_path):
    """One batch: a request with an image (two samples) beside a text-only one; each gets what it
    gets alone."""
    import base64
    import generate
    from server.api import Api
    from server.batcher import Batcher
    path, _ = vision_ckpt
    f = png(tmp_path, "a.png", 50, 80, seed=7)
    url = "data:image/png;base64," + base64.b64encode(f.read_bytes()).decode()
    model, tok = generate.load(path, "cpu", torch.float32)
    api = Api(model, tok, "v", Batcher(model), api_key=None, max_tokens=64)
    with_image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                            {"type": "text", "text": "look"}]}],
                  "max_tokens": 16, "seed": 3, "n": 2}
    text_only = {"messages": [{"role": "user", "content": "look"}], "max_tokens": 16, "seed": 3}
    ([a], how_a), ([b], how_b) = api.chat(with_image), api.chat(text_only)
    api.batcher.generate([a, b])
    both = [api.reply([a], how_a, api.wait([a])), api.reply([b], how_b, api.wait([b]))]
    assert both[0]["diffusion"]["rows_in_batch"] == both[1]["diffusion"]["rows_in_batch"] == 3
    alone = []
    for body in (with_image, text_only):
        reqs, how = api.chat(body)
        api.batcher.generate(reqs)
        alone.append(api.reply(reqs, how, api.wait(reqs)))
    contents = [[c["message"]["content"] for c in reply["choices"]] for reply in both]
    assert contents == [[c["message"]["content"] for c in reply["choices"]] for reply in alone]
    assert contents[0][0] != contents[1][0]  # the image changed what the model said
    assert contents[0][0] == generate.generate(model, tok, "look", images=[f], max_new_tokens=16, seed=3)


def image_prompt_ids(tok, f):
    """What the server makes of one image and "what is it?": the chat prompt, the image expanded."""
    return prompt_with_images(tok, [image_patches(read_image(f), SETTINGS)], "what is it?")


@pytest.mark.slow
def test_two_ranks_with_an_image_generate_what_one_does(vision_ckpt, tmp_path):
    """Under torchrun the text stack is split and the tower held whole on each rank: the same text."""
    path, _ = vision_ckpt
    f = png(tmp_path, "a.png", 60, 60, seed=11)
    args = ["--model", path, "--device", "cpu", "--max-new-tokens", 16, "--seed", 1, "--image", f, "what is it"]
    one, two = single(*args), torchrun("generate.py", *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()


def test_without_pillow_one_line_says_how_to_get_it(vision_ckpt, tmp_path, monkeypatch, capsys):
    import sys
    path, _ = vision_ckpt
    f = png(tmp_path, "a.png", 20, 20)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    rc, out, err = in_process(capsys, "--model", path, "--image", f, "hi")
    assert_one_line_error(rc, err, 2, "reading images needs Pillow: pip install pillow")
