"""muse_jax.evaluate: each metric against an independent computation, and the readers /
writers on small MMBench / MJHQ / GenEval files written here."""

import base64
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import references
from flax import nnx
from PIL import Image
from skimage import metrics as skimage_metrics

from muse_jax import weights
from muse_jax.convert import inception as inception_convert
from muse_jax.evaluate import __main__ as evaluate_cli
from muse_jax.evaluate import codebook, fid, geneval, mjhq, mmbench, quality, results
from muse_jax.evaluate import images as image_lib
from muse_jax.models import inception

scipy_linalg = references.require("scipy.linalg")


def scipy_frechet(mu1, sigma1, mu2, sigma2):
  """The textbook formula with scipy's matrix square root (pytorch-fid's way)."""
  covmean = scipy_linalg.sqrtm(sigma1 @ sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _random_gaussian(rng, dim, n):
  mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)


def test_frechet_distance_matches_scipy():
  rng = np.random.default_rng(0)
  a, b = _random_gaussian(rng, 64, 500), 1.3 * _random_gaussian(rng, 64, 400) + 0.2
  stats = []
  for x in (a, b):
    s = fid.FeatureStats(dim=64)
    for chunk in np.array_split(x, 7):       # accumulated over uneven batches
      s.add(chunk)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.covariance, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
    stats.append(s)
  want = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
  assert want > 1.0
  assert fid.fid(*stats) == pytest.approx(want, rel=1e-7)
  assert fid.fid(stats[0], stats[0]) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_few_images():
  """Fewer images than dimensions (singular covariances): the n x n path equals the full one."""
  rng = np.random.default_rng(8)
  small = [_random_gaussian(rng, 64, n) for n in (10, 7)]
  large = _random_gaussian(rng, 64, 300)
  stats = []
  for x in small + [large]:
    s = fid.FeatureStats(dim=64)
    for chunk in np.array_split(x, 3):
      s.add(chunk)
    stats.append(s)
  assert stats[0].factor() is not None and stats[2].factor() is None
  for a, b in ((0, 1), (0, 2), (2, 1)):
    x, y = stats[a], stats[b]
    want = fid.frechet_distance(x.mean, x.covariance, y.mean, y.covariance)
    # the full path takes square roots of a singular matrix's round-off: ~1e-8 apart
    assert fid.fid(x, y) == pytest.approx(want, rel=1e-7)
    assert fid.fid(y, x) == pytest.approx(want, rel=1e-7)
  merged = fid.FeatureStats(dim=64)
  merged.merge(stats[0])
  merged.merge(stats[2])            # 310 vectors > 64 dimensions: no longer kept
  assert merged.rows is None and merged.count == 310


def test_feature_stats_need_two_images():
  s = fid.FeatureStats(dim=4)
  s.add(np.ones((1, 4)))
  with pytest.raises(ValueError, match="at least 2 images"):
    s.covariance


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
  """Random FID Inception weights in the converted format (a 23M-parameter write)."""
  model = inception.FIDInceptionV3(rngs=nnx.Rngs(0))
  path = tmp_path_factory.mktemp("inception") / "weights"
  weights.save(path, nnx.state(model, nnx.Param), {"kind": inception_convert.KIND})
  return path


# Images are still loaded at 299 x 299; the network resizes them to its smallest input,
# which keeps every layer and cuts the CPU time of a forward pass about 16-fold.
TEST_INPUT_SIZE = inception.MIN_INPUT_SIZE


@pytest.fixture(scope="module")
def features(inception_dir):
  return fid.InceptionFeatures(inception_convert.load(inception_dir, TEST_INPUT_SIZE),
                               batch_size=4)


def _save_images(folder, names, rng, size=32, ext="png"):
  folder.mkdir(parents=True, exist_ok=True)
  for name in names:
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        folder / f"{name}.{ext}")


def _fid_of(x, y):
  """FID of two feature arrays, through the distance checked against SciPy above."""
  stats = []
  for features in (x, y):
    stats.append(fid.FeatureStats())
    stats[-1].add(features)
  return fid.fid(*stats)


def _features_of(paths, features):
  batch = np.stack([image_lib.load(p, inception.INPUT_SIZE) for p in paths])
  return np.concatenate([features(b) for b in image_lib.batches(batch, features.batch_size)])


def test_rfid_against_independent_statistics(features):
  rng = np.random.default_rng(1)
  images = [rng.uniform(-1, 1, (299, 299, 3)).astype(np.float32) for _ in range(5)]
  noise = np.float32(0.3)
  got = fid.rfid(iter(images), lambda x: np.clip(x * 0.5 + noise, -1, 1), features, total=5,
                 show_progress=False)
  real = np.concatenate([features(b) for b in image_lib.batches(images, 4)])
  recon = [np.clip(x * 0.5 + noise, -1, 1) for x in images]
  fake = np.concatenate([features(b) for b in image_lib.batches(recon, 4)])
  assert real.shape == (5, 2048)
  want = _fid_of(real, fake)
  assert got["rfid"] == pytest.approx(want, rel=1e-6)
  assert got["images"] == 5
  want_psnr = np.mean([skimage_metrics.peak_signal_noise_ratio(x, y, data_range=2)
                       for x, y in zip(images, recon)])
  assert got["psnr"] == pytest.approx(want_psnr, rel=1e-4)


def _write_mjhq(root, rng):
  meta = {}
  for category in ("animals", "food"):
    for k in range(3):
      image_id = f"{category[0]}{k:03d}"
      meta[image_id] = {"category": category, "prompt": f"a photo of {category} {k}"}
      _save_images(root / mjhq.IMAGES / category, [image_id], rng, size=40, ext="jpg")
  (root / mjhq.META).write_text(json.dumps(meta))
  _save_images(root / "generated", sorted(meta), rng, size=24)
  return meta


def test_mjhq_per_category_and_overall(tmp_path, features):
  rng = np.random.default_rng(2)
  meta = _write_mjhq(tmp_path, rng)
  got = mjhq.evaluate(tmp_path, tmp_path / "generated", features, show_progress=False)
  every_real, every_fake = [], []
  for category in ("animals", "food"):
    ids = sorted(i for i, m in meta.items() if m["category"] == category)
    real = _features_of([tmp_path / mjhq.IMAGES / category / f"{i}.jpg" for i in ids], features)
    fake = _features_of([tmp_path / "generated" / f"{i}.png" for i in ids], features)
    every_real.append(real)
    every_fake.append(fake)
    want = _fid_of(real, fake)
    assert got["per_category"][category] == pytest.approx(want, rel=1e-6)
  real, fake = np.concatenate(every_real), np.concatenate(every_fake)
  assert got["fid"] == pytest.approx(_fid_of(real, fake), rel=1e-6)
  assert got["images"] == 6 and got["images_per_category"] == {"animals": 3, "food": 3}


def test_mjhq_missing_generated_image_is_named(tmp_path):
  meta = _write_mjhq(tmp_path, np.random.default_rng(3))
  (tmp_path / "generated" / "f002.png").unlink()
  with pytest.raises(FileNotFoundError, match="f002.png"):
    mjhq.generated_paths(tmp_path / "generated", mjhq.read_meta(tmp_path))
  with pytest.raises(ValueError, match="unknown MJHQ categories"):
    mjhq.read_meta(tmp_path, ["people"])
  assert len(mjhq.read_meta(tmp_path, ["food"])) == 3 and len(meta) == 6


def test_fid_command_end_to_end(tmp_path, inception_dir, features, monkeypatch):
  loaded, load = [], inception_convert.load

  def small_inception(weights_dir):
    loaded.append(weights_dir)
    return load(weights_dir, TEST_INPUT_SIZE)

  monkeypatch.setattr(inception_convert, "load", small_inception)
  rng = np.random.default_rng(4)
  _save_images(tmp_path / "real", ["a", "b", "c"], rng)
  _save_images(tmp_path / "fake", ["x", "y", "z"], rng)
  got = evaluate_cli.main(["fid", f"--real={tmp_path / 'real'}", f"--fake={tmp_path / 'fake'}",
                           f"--inception={inception_dir}", "--batch_size=4", "--no_progress",
                           f"--out_dir={tmp_path / 'out'}",
                           f"--save_stats={tmp_path / 'real.npz'}"])
  assert loaded == [str(inception_dir)]
  real = _features_of(sorted((tmp_path / "real").iterdir()), features)
  fake = _features_of(sorted((tmp_path / "fake").iterdir()), features)
  assert got["fid"] == pytest.approx(_fid_of(real, fake), rel=1e-6)
  assert got["real_images"] == 3 and got["fake_images"] == 3
  assert json.loads((tmp_path / "out" / "fid.json").read_text())["fid"] == got["fid"]
  assert _tensorboard_scalars(tmp_path / "out")["fid/fid"] == pytest.approx(got["fid"], rel=1e-6)
  # reference statistics saved once (pytorch-fid's .npz keys), then reused without images
  mu, sigma = fid.load_gaussian(tmp_path / "real.npz")
  np.testing.assert_allclose(mu, real.mean(0), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(real, rowvar=False), rtol=1e-6, atol=1e-9)
  reused = evaluate_cli.main(["fid", f"--real={tmp_path / 'real.npz'}",
                              f"--fake={tmp_path / 'fake'}", f"--inception={inception_dir}",
                              "--batch_size=4", "--no_progress"])
  assert reused["fid"] == pytest.approx(got["fid"], rel=1e-7) and "real_images" not in reused


def _tensorboard_scalars(out_dir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(out_dir / "tensorboard"))
  acc.Reload()
  return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def test_quality_folders_match_scikit_image(tmp_path):
  rng = np.random.default_rng(5)
  names = [f"img{k}" for k in range(5)]       # 5 images in batches of 2: a padded batch
  _save_images(tmp_path / "ref", names, rng, size=48)
  (tmp_path / "cand").mkdir()
  for name in names:
    ref = np.asarray(Image.open(tmp_path / "ref" / f"{name}.png")).astype(np.int64)
    noisy = np.clip(ref + rng.integers(-30, 31, ref.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "cand" / f"{name}.png")
  got = quality.folders(tmp_path / "ref", tmp_path / "cand", size=48, batch_size=2,
                        show_progress=False)
  pairs = [(image_lib.load(tmp_path / "ref" / f"{n}.png", 48),
            image_lib.load(tmp_path / "cand" / f"{n}.png", 48)) for n in names]
  want_psnr = np.mean([skimage_metrics.peak_signal_noise_ratio(x, y, data_range=2)
                       for x, y in pairs])
  want_ssim = np.mean([skimage_metrics.structural_similarity(
      x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=2) for x, y in pairs])
  assert got["images"] == 5
  assert got["psnr"] == pytest.approx(want_psnr, rel=1e-4)
  assert got["ssim"] == pytest.approx(want_ssim, abs=2e-4)
  (tmp_path / "cand" / "img3.png").unlink()
  with pytest.raises(FileNotFoundError, match="'img3'"):
    quality.folders(tmp_path / "ref", tmp_path / "cand", size=48, show_progress=False)


def test_codebook_usage_over_batches(tmp_path):
  rng = np.random.default_rng(6)
  batches = [rng.integers(0, 40, (3, 4, 4)) for _ in range(5)]   # ids 40..63 never used
  usage = codebook.dataset_usage(iter(batches), 64, total=5, show_progress=False)
  every = np.concatenate([b.reshape(-1) for b in batches])
  counts = np.bincount(every, minlength=64)
  p = counts[counts > 0] / counts.sum()
  summary = usage.summary()
  assert summary["tokens"] == 5 * 48
  assert summary["used_codes"] == len(np.unique(every))
  assert summary["utilisation"] == pytest.approx(len(np.unique(every)) / 64)
  assert summary["perplexity"] == pytest.approx(np.exp(scipy_entropy(p)), rel=1e-12)
  other = codebook.CodebookUsage(64)
  other.add(np.arange(64))
  usage.merge(other)
  assert usage.summary()["utilisation"] == 1.0
  image = codebook.CodebookUsage(64)
  image.add(np.array([0, 0, 0, 5]))
  hist = image.histogram_image(height=32, width=64)
  assert hist.shape == (32, 64, 3) and hist.dtype == np.uint8
  assert (hist[:, 0] != 255).all()                   # the most used code: a full-height bar
  assert tuple(hist[-1, 1]) == (220, 30, 30)         # unused code marked
  with pytest.raises(ValueError, match="outside"):
    image.add(np.array([64]))
  np.save(tmp_path / "codes.npy", every)
  got = evaluate_cli.main(["codebook", f"--codes={tmp_path / 'codes.npy'}", "--codebook_size=64",
                           f"--out_dir={tmp_path / 'out'}"])
  assert got["used_codes"] == summary["used_codes"]
  assert _tensorboard_scalars(tmp_path / "out")["codebook/perplexity"] == pytest.approx(
      summary["perplexity"], rel=1e-6)


def scipy_entropy(p):
  import scipy.stats
  return scipy.stats.entropy(p)


def _b64_png(color, size=(20, 10)):
  buffer = io.BytesIO()
  Image.new("RGB", size, color).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def _write_mmbench(path):
  header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
  rows = [
      ["0", 'What colour is the "image"?\nLook closely.', "", "red", "green", "blue", "white",
       "A", "colour", _b64_png((255, 0, 0))],
      ["1", "Is it bright?", "Look at the pixels.", "yes", "no", "", "", "B", "light",
       _b64_png((10, 10, 10))],
      ["2", "How wide is it?", "", "20", "10", "5", "", "A", "size", "0"],   # image of row 0
  ]
  with path.open("w", newline="") as f:   # quoted as pandas' to_csv(sep="\t") quotes
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header] + rows)


def test_mmbench_reader_prompt_and_circular_evaluation(tmp_path):
  _write_mmbench(tmp_path / "mmbench.tsv")
  questions = mmbench.read_tsv(tmp_path / "mmbench.tsv")
  assert [q.options for q in questions[1:]] == [{"A": "yes", "B": "no"},
                                                 {"A": "20", "B": "10", "C": "5"}]
  assert questions[2].image_b64 == questions[0].image_b64
  assert mmbench.build_prompt(questions[1].question, questions[1].hint, questions[1].options) == (
      "Hint: Look at the pixels.\nQuestion: Is it bright?\nOptions:\nA. yes\nB. no\n"
      "Please select the correct answer from the options above. \n")
  assert questions[0].question == 'What colour is the "image"?\nLook closely.'
  truth = {'What colour is the "image"?': "red", "Is it bright?": "no", "How wide is it?": "20"}
  asked = []

  def scripted(image, prompt):
    """Knows every answer, but for the size question always replies "A"."""
    asked.append((image.size, prompt))
    question = prompt.split("Question: ")[1].split("\n")[0]
    if question == "How wide is it?":
      return "A"
    options = dict(line.split(". ", 1) for line in prompt.split("\n") if line[1:3] == ". ")
    letter = next(k for k, v in options.items() if v == truth[question])
    return f"The answer is ({letter})." if question == "Is it bright?" else letter

  got = mmbench.evaluate(questions, scripted, show_progress=False)
  assert got["asked"] == 4 + 2 + 3 and len(asked) == 9
  assert asked[0][0] == (20, 10)
  assert got["accuracy"] == pytest.approx(2 / 3)
  assert got["per_category"] == {"colour": 1.0, "light": 1.0, "size": 0.0}
  once = mmbench.evaluate(questions, scripted, circular=False, show_progress=False)
  assert once["accuracy"] == 1.0 and once["asked"] == 3


def test_mmbench_rotations_and_answer_extraction():
  q = mmbench.Question("7", "q", None, {"A": "cat", "B": "dog", "C": "cow"}, "B", "c", "")
  got = mmbench.rotations(q)
  assert got == [({"A": "cat", "B": "dog", "C": "cow"}, "B"),
                 ({"A": "dog", "B": "cow", "C": "cat"}, "A"),
                 ({"A": "cow", "B": "cat", "C": "dog"}, "C")]
  options = {"A": "cat", "B": "dog"}
  assert mmbench.extract_choice("B", options) == "B"
  assert mmbench.extract_choice("(A)", options) == "A"
  assert mmbench.extract_choice("Answer: B. dog", options) == "B"
  assert mmbench.extract_choice("It is a dog", options) == "B"
  assert mmbench.extract_choice("A or B", options) is None
  assert mmbench.extract_choice("no idea", options) is None


def test_mmbench_bad_answer_is_an_error(tmp_path):
  (tmp_path / "bad.tsv").write_text(
      "index\tquestion\tA\tB\tanswer\tcategory\timage\n0\tq\tx\ty\tC\tc\t" + _b64_png(0) + "\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: answer 'C'"):
    mmbench.read_tsv(tmp_path / "bad.tsv")


def test_geneval_layout(tmp_path):
  metadata = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}],
               "prompt": "a photo of a cat"},
              {"tag": "two_object", "include": [{"class": "dog", "count": 1},
                                                {"class": "cup", "count": 1}],
               "prompt": "a photo of a dog and a cup"}]
  (tmp_path / "evaluation_metadata.jsonl").write_text(
      "".join(json.dumps(m) + "\n" for m in metadata))
  rng = np.random.default_rng(7)
  _save_images(tmp_path / "gen", ["00000_0", "00000_1", "00001_0", "00001_1", "00001_10",
                                  "00001_2"], rng, size=16)
  got = evaluate_cli.main(["geneval", f"--metadata={tmp_path / 'evaluation_metadata.jsonl'}",
                           f"--images={tmp_path / 'gen'}", f"--out={tmp_path / 'out'}",
                           "--no_progress"])
  assert got["images"] == 6
  for i, entry in enumerate(metadata):
    folder = tmp_path / "out" / f"{i:05d}"
    assert [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()] \
        == [entry]
  samples = sorted(p.name for p in (tmp_path / "out" / "00001" / "samples").iterdir())
  assert samples == ["0000.png", "0001.png", "0002.png", "0003.png"]
  # sample 10 sorts numerically: after 2, so it is 0003
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "out" / "00001" / "samples" / "0003.png")),
      np.asarray(Image.open(tmp_path / "gen" / "00001_10.png")))
  float_images = [[rng.uniform(-1, 1, (8, 8, 3))], [np.zeros((8, 8, 3), np.uint8)]]
  assert geneval.write(tmp_path / "direct", metadata, float_images, show_progress=False) == 2
  with pytest.raises(ValueError, match="images for 1 prompts"):
    geneval.write(tmp_path / "short", metadata, float_images[:1], show_progress=False)


def test_results_json_and_tensorboard(tmp_path):
  path = results.write(tmp_path, "mmbench", {"accuracy": 0.5, "per_category": {"a": 1.0},
                                             "records": [{"reply": "A"}], "circular": True})
  assert json.loads(path.read_text())["per_category"] == {"a": 1.0}
  assert _tensorboard_scalars(tmp_path) == {"mmbench/accuracy": 0.5,
                                            "mmbench/per_category/a": 1.0}


def _run_cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=300)


def test_cli_user_errors_are_one_line(tmp_path):
  done = _run_cli("muse_jax.evaluate", "quality", f"--reference={tmp_path / 'missing'}",
                  f"--candidate={tmp_path}")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"python -m muse_jax.evaluate: error: {tmp_path / 'missing'} is not a directory of images"]


def test_convert_llm_from_hf_errors_are_one_line(tmp_path):
  done = _run_cli("muse_jax.convert", "llm-from-hf", f"--hf_dir={tmp_path / 'none'}",
                  f"--out={tmp_path / 'out'}")
  assert done.returncode == 1, done.stderr
  assert "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines() == [
      f"python -m muse_jax.convert: error: {tmp_path / 'none'} has no config.json"]
  (tmp_path / "gpt2").mkdir()
  (tmp_path / "gpt2" / "config.json").write_text(json.dumps(
      {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  done = _run_cli("muse_jax.convert", "llm-from-hf", f"--hf_dir={tmp_path / 'gpt2'}",
                  f"--out={tmp_path / 'out'}")
  assert done.returncode == 1 and "Traceback" not in done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "unsupported architecture 'GPT2LMHeadModel'" in lines[0]
