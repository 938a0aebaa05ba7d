"""Running a core progress generator in napari's ``thread_worker``, shared by the dock widgets."""

from __future__ import annotations

from napari.qt.threading import create_worker

from ..inference import Cancelled


def start_job(owner, job, run_button, cancel_button, *, on_yield, on_return, on_error, on_finish=None):
    """Run the generator ``job`` in a worker thread and return the worker.

    A :class:`Cancelled` raised by the job ends it like a return of ``None`` (a normal end, not an error).
    ``owner.worker`` holds the worker while it runs; the Run button is disabled and Cancel enabled meanwhile.
    """

    def work():
        try:
            return (yield from job)
        except Cancelled:
            return None

    worker = create_worker(work, _start_thread=False)

    def finished():
        if on_finish is not None:
            on_finish()
        owner.worker = None
        run_button.enabled = True
        cancel_button.enabled = False

    worker.yielded.connect(on_yield)
    worker.returned.connect(on_return)
    worker.errored.connect(on_error)
    worker.finished.connect(finished)
    owner.worker = worker
    run_button.enabled = False
    cancel_button.enabled = True
    worker.start()
    return worker
