"""gunicorn settings for the AdaFace service: ``gunicorn -c gunicorn.conf.py flask_http_server:app``.

gunicorn also reads this file when started from this folder without ``-c`` (it is the default
config file name), so the original command line gets these defaults too; command-line flags
such as ``-w 3`` or ``-b`` still win. Values come from the ``ADAFACE_*`` settings (config.py).

CPU inference: one worker by default, so that every request shares one model and one batcher
(batching across requests needs them in one process), with torch using every core. With more
workers each gets cores / workers torch threads, so cores are never oversubscribed.

Each server has its own temporary folder (``adaface-gunicorn-*``, :mod:`serving.run_folder`),
removed when it exits (``on_exit``). It holds:

* gunicorn's control socket, ``gunicorn.ctl`` (for ``gunicornc -s PATH``; gunicorn logs the path
  at start). gunicorn's default is one path for every server of a user
  (``$XDG_RUNTIME_DIR/gunicorn.ctl`` or ``~/.gunicorn/gunicorn.ctl``): a second server took it
  over and stopping either one removed it. ``--control-socket PATH`` or ``--no-control-socket``
  on the command line still win.
* the Prometheus multiprocess folder, ``metrics/``, unless ``PROMETHEUS_MULTIPROC_DIR`` is set;
  a folder given that way is the caller's, and stays.

Requests gunicorn refuses itself (a request line or headers over its limits, a malformed
request) are answered in the service's JSON by the worker class,
:class:`serving.gunicorn_worker.JsonGeventWorker`. ``--worker-class gevent`` on the command line
(the original command) replaces it, and those answers are gunicorn's HTML again.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config import Settings  # noqa: E402
from serving import run_folder  # noqa: E402

_settings = Settings.from_env()

bind = _settings.bind
workers = _settings.workers
worker_class = "serving.gunicorn_worker.JsonGeventWorker"
worker_connections = 1000
timeout = _settings.timeout
graceful_timeout = 30
keepalive = 5
accesslog = "-"
# who called (an API key's name, keyless; "-" on open routes), never the key itself
access_log_format = '%(h)s %({adaface.caller}e)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
errorlog = "-"
loglevel = _settings.log_level.lower()

control_socket = str(run_folder.folder() / "gunicorn.ctl")

# Prometheus: every worker writes its samples here; /metrics sums the live workers.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics = run_folder.folder() / "metrics"
    _metrics.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics)


def on_starting(server):
    """With ADAFACE_PRECISION=int8, calibrate and gate the int8 graph once, in a separate process,
    before any worker starts (``python AdaFaceFeature.py prepare``): the workers then load it from
    the cache instead of each calibrating while gunicorn waits for it to boot."""
    if _settings.precision != "int8":
        return
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    server.log.info("preparing the int8 graph (once per weights and calibration folder)")
    done = subprocess.run([sys.executable, os.path.join(here, "AdaFaceFeature.py"), "prepare"], cwd=here,
                          capture_output=True, text=True)
    if done.returncode != 0:
        server.log.warning("int8 preparation failed (the workers will try again): %s", done.stderr.strip()[-2000:])
    else:
        server.log.info("int8 prepared: %s", done.stdout.strip())


def post_fork(server, worker):
    """Give each worker cores / workers torch threads unless ADAFACE_THREADS says otherwise."""
    if not os.environ.get("ADAFACE_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["ADAFACE_THREADS"] = str(max(1, cores // max(1, server.cfg.workers)))


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the aggregated metrics."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove this server's folder: its control socket, and the metrics folder made here."""
    run_folder.remove()
