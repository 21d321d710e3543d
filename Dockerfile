# One image for every distrack service; the command picks the service:
#   docker run IMAGE scheduler --scheduler_port=:8081
#   docker run IMAGE coordinator --coordinator_port=:8080
#   docker run IMAGE worker --coordinator=HOST:8080 --output_dir=/app/output
#   docker run IMAGE migrate
# docker-compose.yml wires them to PostgreSQL.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package is built from /src and installed into site-packages; /src is removed afterwards so
# nothing at run time imports the source tree instead of the installed package.
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when setup.cfg changes, not on every
# code change. install_requires is read from setup.cfg so the list lives in one place.
COPY pyproject.toml setup.cfg ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package itself. README.md is the long description in setup.cfg; sql/ ships inside the
# package as distrack.sql; the gRPC code is already generated in distrack/rpc/ (proto/ is not needed).
COPY README.md ./
COPY sql/ sql/
COPY distrack/ distrack/
# The checks after the install: the console script runs, the SQL shipped inside the package, bash exists.
RUN pip install --no-cache-dir . \
    && cd / && rm -rf /src \
    && distrack --help > /dev/null \
    && python -c "from distrack.db.queries import migration_files, queries; assert migration_files() and queries()" \
    && command -v bash > /dev/null

# Tasks run with `bash -c` (bash is part of the Debian base). The services run as an unprivileged
# user that owns /app, so a worker can write /app/output (or a named volume mounted there).
# A bind-mounted host folder keeps its host owner instead: see the worker's `user:` in
# docker-compose.yml.
RUN useradd --create-home --uid 1000 --shell /bin/bash distrack \
    && mkdir -p /app/output \
    && chown -R distrack:distrack /app
WORKDIR /app
USER distrack

# scheduler (HTTP), coordinator (gRPC), worker (gRPC)
EXPOSE 8081 8080 8000

ENTRYPOINT ["distrack"]
CMD ["--help"]
