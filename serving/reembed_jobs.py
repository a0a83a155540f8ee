"""Gallery re-embeds started over HTTP: one background job per gallery in this worker.

``POST /v1/galleries/{g}/reembed`` starts :func:`gallery.reembed.reembed` in a native thread,
with the service's micro-batcher as the forward (so it shares the model with live requests);
``GET`` reports its progress. The progress itself lives in the store (the staged vectors), so a
worker that did not start the job, or a job interrupted by a restart, still reports it
(``interrupted``: post again to resume).
"""
from __future__ import annotations

import logging

from adaface.threads import allocate_lock, start_new_thread
from gallery.reembed import reembed

logger = logging.getLogger(__name__)


class ReembedJobs:
    """Re-embed jobs of one worker over the galleries of ``state`` (a :class:`GalleryState`)."""

    def __init__(self, state):
        self.state = state
        self._lock = allocate_lock()
        self._running: dict = {}   # gallery -> None while running, or the exception it failed with
        self._results: dict = {}   # gallery -> the last ReembedResult

    def start(self, gallery: str, model, embed, actor=None) -> dict:
        """Start re-embedding ``gallery`` with ``model`` unless it runs already or is on it; its status."""
        status = self.status(gallery, model)
        if status["status"] in ("done", "running"):
            return status
        with self._lock:
            self._running[gallery] = None
        start_new_thread(self._run, (gallery, model, embed, actor))
        return {**status, "status": "running"}

    def _run(self, gallery: str, model, embed, actor) -> None:
        try:
            result = reembed(self.state.store(), gallery, model, embed, actor=actor)
            logger.info("gallery %s: re-embedded with %s (%d faces, %d left out)", gallery, model.name,
                        result.faces, len(result.left_out))
            with self._lock:
                self._results[gallery] = result
                self._running.pop(gallery, None)
        except Exception as exc:  # reported by status(); the staged vectors are kept for a retry
            logger.exception("gallery %s: re-embed failed", gallery)
            with self._lock:
                self._running[gallery] = exc

    def status(self, gallery: str, model) -> dict:
        """The job's status: running here, done (the gallery is on ``model``), failed, interrupted
        (vectors staged, no job here), or not started."""
        store = self.state.store()
        found = store.get_gallery(gallery)
        progress = store.reembed_state(gallery, model)
        with self._lock:
            running = gallery in self._running
            failure = self._running.get(gallery)
            result = self._results.get(gallery)
        on_model = found.model is not None and (found.model.arch, found.model.fingerprint) == (model.arch, model.fingerprint)
        if running and failure is None:
            status = "running"
        elif on_model:
            status = "done"
        elif failure is not None:
            status = "failed"
        else:
            status = "interrupted" if progress.staged else "not_started"
        body = {"gallery": gallery, "model": model.to_dict(), "status": status,
                "embedded": progress.with_crop if status == "done" else progress.staged,
                "with_crop": progress.with_crop, "without_crop": progress.without_crop}
        if status == "done" and result is not None and result.model == model:
            body["left_out"] = [{"face_id": face_id, "identity": name} for face_id, name in result.left_out]
        if status == "failed":
            body["error"] = str(failure) or type(failure).__name__
        return body
