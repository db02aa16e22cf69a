"""The worker's SIGTERM handler (train/preemption.py) in a plain process: the first SIGTERM is a notice, the second
does what the process did before. The drain notice and the Ray Train worker path run in
tests/e2e/test_storage_two_nodes.py (a real drain and real SIGTERMs to Ray Train workers)."""
import signal
import subprocess
import sys
import textwrap


def test_first_sigterm_is_a_notice_and_the_second_runs_the_previous_handler():
    code = textwrap.dedent("""
        import os, signal, sys, time
        from rayft.train.preemption import PreemptionWatch

        def previous(signum, frame):
            print("previous handler", flush=True)
            sys.exit(7)

        signal.signal(signal.SIGTERM, previous)
        watch = PreemptionWatch()
        watch.install()
        assert watch.sigterm and watch.notice() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        notice = watch.notice()
        print("notice", notice.source, round(time.time() - notice.seen_at_s) < 5, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        print("not reached", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 7, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["notice SIGTERM True", "previous handler"], out.stdout + out.stderr


def test_uninstall_puts_the_previous_handler_back():
    from rayft.train.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch()
    watch.install()
    assert signal.getsignal(signal.SIGTERM) is not before
    watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
