# CPU image of the AdaFace embedding service.
#   docker build -t adaface .
#   docker run -p 30035:30035 -v "$PWD/pretrained:/app/pretrained:ro" adaface
# Bake the Hugging Face weights into the image instead of mounting them:
#   docker build --build-arg BAKE_WEIGHTS=huggingface -t adaface .
# The original service's command line still works as an override:
#   docker run -p 30035:30035 adaface gunicorn -w 3 --worker-class gevent -b 0.0.0.0:30035 --timeout 300 flask_http_server:app
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp: OpenMP runtime for torch and OpenCV on slim images (the base image's current one).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 adaface

WORKDIR /app

# Dependencies first, so code changes do not reinstall them. torch comes from the CPU-only
# index (the PyPI wheel carries CUDA libraries, several GB); it satisfies the pin in requirements.txt.
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps -r requirements-nodeps.txt

COPY --chown=adaface:adaface . .

# none: mount the weights at /app/pretrained (or set ADAFACE_WEIGHTS); huggingface: download now.
ARG BAKE_WEIGHTS=none
RUN if [ "$BAKE_WEIGHTS" = "huggingface" ]; then python tools/fetch_weights.py; fi \
    && mkdir -p /app/data && chown adaface:adaface /app/data /app/pretrained

USER 10001
# Compile MTCNN's resampling kernels now: numba caches the machine code beside the source (and
# compiles again, once, on a CPU of another kind).
RUN python -c "import numpy as np; from face_alignment.resample import Resampler; Resampler(np.zeros((8, 8, 3), np.uint8)).resize((4, 4))"
ENV ADAFACE_BIND=0.0.0.0:30035
# /app/data holds the gallery database and, with no keys configured, the admin key made at first
# start (data/admin.key, mode 0600): mount a volume there (-v adaface-data:/app/data) to keep both,
# and read the key with `docker exec <container> cat /app/data/admin.key`.
VOLUME /app/data
EXPOSE 30035
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:30035/readyz', timeout=4).status != 200)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "flask_http_server:app"]
