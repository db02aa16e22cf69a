"""The driver's progress printer (train/trainer.py) over a real Ray queue: lines are printed as workers send them,
and a queue that fails (its actor gone, as when its node dies) is said once instead of silently ending the
progress lines."""
import time


def test_progress_lines_and_a_failed_queue_is_reported(ray_local):
    import ray
    from ray.util.queue import Queue

    from rayft.train.trainer import ProgressPrinter

    lines: list[str] = []
    queue = Queue(maxsize=10, actor_options={"num_cpus": 0})
    printer = ProgressPrinter(queue, lines.append)
    printer.start()
    queue.put({"step": 2, "start_step": 0, "total": 4, "elapsed_s": 1.0, "loss": 1.5})
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lines and lines[0].startswith("step 2/4  loss 1.5000"), lines
    ray.kill(queue.actor)
    while len(lines) < 2 and time.monotonic() < deadline + 30:
        time.sleep(0.1)
    printer.stop()
    assert len(lines) == 2 and lines[1].startswith("warning: no more progress lines: the progress queue failed ("), lines
    assert "training goes on" in lines[1]
