"""TensorBoard gets what people look at: the stage's pictures as images, the loop's rate and learning rate."""
import glob
import io
import os
import struct

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from recall_jax.train import logging as tb_logging


def _events(directory):
  """Every Event of the TFRecord event files under `directory` (length, crc, payload, crc per record)."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return out


def test_a_stage_s_pictures_become_tensorboard_images(tmp_path):
  Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "mined.png")
  Image.new("RGB", (12, 40), (10, 10, 200)).save(tmp_path / "retrievals_cirr.png")
  (tmp_path / "baseline").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "baseline" / "retrievals_cirr.png")
  (tmp_path / "checkpoints").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "checkpoints" / "not_a_sheet.png")
  (tmp_path / "notes.txt").write_text("not a picture")
  assert tb_logging.log_pictures(str(tmp_path), step=7) == ["mined.png", "retrievals_cirr.png",
                                                            "baseline/retrievals_cirr.png"]
  images = {v.tag: (e.step, v.image) for e in _events(str(tmp_path / "tensorboard")) for v in e.summary.value}
  assert set(images) == {"pictures/mined", "pictures/retrievals_cirr", "pictures/baseline/retrievals_cirr"}
  step, image = images["pictures/mined"]
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
  assert step == 7 and (image.width, image.height) == (30, 20) and tuple(decoded[5, 5]) == (200, 10, 10)
  assert tb_logging.log_pictures(str(tmp_path / "missing")) == []


def test_every_finished_stage_logs_its_pictures(tmp_path):
  from recall_jax.stages import artifacts

  def stage(out):
    Image.new("RGB", (10, 10), (0, 200, 0)).save(os.path.join(out, "mined.png"))
    return {}

  artifacts.run_stage(str(tmp_path), "mine", stage, log=lambda _: None)
  tags = {v.tag for e in _events(str(tmp_path / "mine" / "tensorboard")) for v in e.summary.value}
  assert tags == {"pictures/mined"}
