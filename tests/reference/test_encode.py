"""Image folder -> VAE latents -> store: resumable, bad images reported, disk checked first."""

import numpy as np
import pytest
import torch
from PIL import Image

from steersample.reference.encode import check_vae_matches, encode_folder, encode_pixels, scan_images
from steersample.reference.sharded import ShardedReferenceSet
from steersample.testing import tiny_vae


def write_images(folder, count, size=(8, 8), seed=0, classes=None):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def vae():
    return tiny_vae(latent_channels=4, seed=0)


def test_latents_are_the_vae_encoding_of_each_image(tmp_path, vae):
    paths = write_images(tmp_path / "img", 5, size=(8, 6))
    manifest = encode_folder(tmp_path / "img", vae, tmp_path / "store", shard_size=2, batch_size=2,
                             progress=False)
    assert manifest.count == 5 and manifest.sample_shape == (4, 6, 8) and len(manifest.shards) == 3
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)).permute(2, 0, 1)
                          for p in paths]) / 127.5 - 1.0
    ref = ShardedReferenceSet.open(tmp_path / "store")
    assert torch.allclose(ref.latents, encode_pixels(vae, pixels), atol=1e-6)
    check_vae_matches(ref.sample_shape, vae, (8, 6))
    with pytest.raises(ValueError, match=r"latents of shape \(4, 8, 8\).*holds latents of shape \(4, 6, 8\)"):
        check_vae_matches(ref.sample_shape, vae, (8, 8))


def test_resumed_build_equals_uninterrupted_build(tmp_path, vae, monkeypatch):
    write_images(tmp_path / "img", 11, classes=["cat", "dog"])
    kwargs = dict(shard_size=3, batch_size=2, labels_from_folders=True, progress=False)
    whole = encode_folder(tmp_path / "img", vae, tmp_path / "whole", **kwargs)

    real_encode, calls = vae.encode, []

    def interrupted(pixels):
        calls.append(pixels.shape[0])
        if len(calls) == 6:   # shape probe, shard 0 (2 + 1), shard 1 (2 + 1), then in shard 2
            raise KeyboardInterrupt
        return real_encode(pixels)

    monkeypatch.setattr(vae, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(tmp_path / "img", vae, tmp_path / "part", **kwargs)
    done = sorted(p.name for p in (tmp_path / "part").glob("shard-*"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(FileNotFoundError, match="has not finished"):
        ShardedReferenceSet.open(tmp_path / "part")

    calls.clear()
    monkeypatch.setattr(vae, "encode", lambda pixels: (calls.append(pixels.shape[0]), real_encode(pixels))[1])
    resumed = encode_folder(tmp_path / "img", vae, tmp_path / "part", **kwargs)
    assert sum(calls) == 11 - 6 + 1             # only shards 2, 3 (3 + 2 images) and the shape probe
    assert resumed.store_id == whole.store_id and resumed.metadata == whole.metadata
    for info in whole.shards:
        assert (tmp_path / "part" / info.file).read_bytes() == (tmp_path / "whole" / info.file).read_bytes()
    ref = ShardedReferenceSet.open(tmp_path / "part", verify=True)
    assert torch.equal(ref.labels, torch.tensor([0, 1] * 5 + [0])[torch.tensor(
        sorted(range(11), key=lambda i: (["cat", "dog"][i % 2], i)))])
    assert resumed.metadata["class_names"] == ["cat", "dog"]

    other = tiny_vae(latent_channels=4, seed=1)
    with pytest.raises(ValueError, match="different inputs.*vae_sha256"):
        encode_folder(tmp_path / "img", other, tmp_path / "part", **kwargs)


def test_unreadable_and_mixed_size_images_are_named_and_skipped_only_when_asked(tmp_path, vae):
    write_images(tmp_path / "img", 4)
    write_images(tmp_path / "img" / "big", 1, size=(16, 16))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"(?s)2 of 6 images.*broken\.png: unreadable.*"
                                         r"big/img000\.png: size 16x16, expected 8x8.*--skip-bad"):
        encode_folder(tmp_path / "img", vae, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    manifest = encode_folder(tmp_path / "img", vae, tmp_path / "store", skip_bad=True, progress=False)
    assert manifest.count == 4
    assert [s["file"] for s in manifest.metadata["skipped"]] == ["broken.png", "big/img000.png"]
    scan = scan_images(tmp_path / "img", image_size=(16, 16), progress=False)
    assert scan.files == ("big/img000.png",) and len(scan.mismatched) == 4


def test_disk_space_is_checked_before_any_shard_is_written(tmp_path, vae, monkeypatch):
    import shutil

    write_images(tmp_path / "img", 3)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(OSError, match="not enough disk space.*need 0.06 GiB, 0.00 GiB free"):
        encode_folder(tmp_path / "img", vae, tmp_path / "store", progress=False)
    assert not list((tmp_path / "store").glob("shard-*"))
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_bad_arguments(tmp_path, vae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_folder(tmp_path / "missing", vae, tmp_path / "store", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        encode_folder(tmp_path / "empty", vae, tmp_path / "store", progress=False)
    write_images(tmp_path / "flat", 2)
    with pytest.raises(ValueError, match="inside a class folder"):
        encode_folder(tmp_path / "flat", vae, tmp_path / "store", labels_from_folders=True, progress=False)
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        encode_folder(tmp_path / "flat", vae, tmp_path / "store", shard_size=0, progress=False)


def test_index_build_command_resumes_and_reports(tmp_path, vae, capsys):
    from steersample.cli import main

    write_images(tmp_path / "img", 6)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    argv = ["index", "build", str(tmp_path / "store"), "--images", str(tmp_path / "img"),
            "--vae", str(tmp_path / "pipe"), "--shard-size", "4", "--pool", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6 latents of shape (4, 8, 8) in 2 shards" in out and "Flat" in out
    ref = ShardedReferenceSet.open(tmp_path / "store")
    assert ref.index is not None and ref.manifest.key_dim == 64
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("*.safetensors")}
    assert main(argv) == 0                        # a re-run finds everything done
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("*.safetensors")} == before
    assert main(["index", "info", str(tmp_path / "store"), "--verify"]) == 0
    assert "shards verified" in capsys.readouterr().out

    assert main(["index", "build", str(tmp_path / "x"), "--images", str(tmp_path / "img")]) == 2
    assert "--images needs --vae" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "x"), "--images", str(tmp_path / "img"),
                 "--vae", str(tmp_path / "img")]) == 2
    assert "no VAE at" in capsys.readouterr().err
