"""kill -9 while the canonical KG is being written, then rerun: the same bytes, nothing half-written.

(The encode stage's kill-and-resume test is in test_vision.py; train's in test_training.py.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from elmm.kg.synthetic import generate_synthetic

WORLD = dict(seed=3, entities=40, images_per_entity=4, image_size=16)

CHILD = """
import sys, time
import elmm.kg.synthetic as synthetic
render = synthetic.render
def slow(*args, **kwargs):  # leaves time to kill the process half-way through the images
    time.sleep(0.02)
    return render(*args, **kwargs)
synthetic.render = slow
synthetic.generate_synthetic(sys.argv[1], progress=False, **{world})
"""


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_during_kg_writing_leaves_nothing_half_written(tmp_path: Path) -> None:
    reference = tmp_path / "reference" / "kg"
    generate_synthetic(reference, progress=False, **WORLD)
    out = tmp_path / "data" / "kg"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(world=WORLD)))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(".kg.*.tmp/*")):  # the KG's temporary directory has files
            assert proc.poll() is None, "the generator exited before writing anything"
            assert time.monotonic() < deadline, "nothing written after 120 s"
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    assert not out.exists()  # the canonical KG appears only complete
    assert list(out.parent.glob(".kg.*.tmp"))  # the killed run's temporary is there ...
    generate_synthetic(out, progress=False, **WORLD)
    assert not list(out.parent.glob(".kg.*.tmp"))  # ... and the rerun removed it
    assert _files(out) == _files(reference)
