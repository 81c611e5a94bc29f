"""Neuronpedia's database, for conformance tests: its Prisma schema as PostgreSQL tables, its importer's rules.

Three parts, none of them Neuronpedia's code:

- `parse_schema` reads Neuronpedia's own `schema.prisma` and `Schema.ddl()` writes the tables Prisma's
  migrations would make from it: column types, NOT NULL, the defaults the database holds (not the ones
  Prisma's client fills in, such as cuid()), primary keys, unique indexes and foreign keys (immediate).
- `import_export` loads a `v1/` export folder the way Neuronpedia's admin importer does (the rules are
  restated in the reference README beside the schema): create-if-absent metadata rows through a
  Prisma-like create, then features and activations through `jsonb_to_recordset` with
  `ON CONFLICT DO NOTHING`. It counts what landed and what was skipped, and keeps the database's errors.
- `PostgresServer` runs a throw-away PostgreSQL (initdb, pg_ctl) in a temporary folder, reached
  through its unix socket with `psql`; as root, the server runs as the `postgres` user.
"""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self

ROOT = Path(__file__).resolve().parents[1]
# Neuronpedia's schema.prisma, kept as test data beside the export tests ($XC_NEURONPEDIA_SCHEMA: another one).
SCHEMA_PLACES = [os.environ.get("XC_NEURONPEDIA_SCHEMA"), ROOT / "tests" / "export" / "neuronpedia" / "schema.prisma"]
NOT_INSTALLED = "PostgreSQL not installed: apt-get install postgresql"
LIST_LIMIT = 1000  # one un-paginated object listing per prefix
# What the importer reads, in its order: metadata files (one row each) then folders of gzipped JSON lines.
METADATA = (("release.jsonl", "SourceRelease"), ("model.jsonl", "Model"), ("sourceset.jsonl", "SourceSet"),
            ("source.jsonl", "Source"))
BATCHES = (("features", "Neuron"), ("activations", "Activation"), ("explanations", "Explanation"))


def find_schema() -> Path | None:
    for place in SCHEMA_PLACES:
        if place and Path(place).is_file():
            return Path(place)
    return None


# -- the Prisma schema ---------------------------------------------------------------

SCALARS = {"String": "TEXT", "Int": "INTEGER", "BigInt": "BIGINT", "Float": "DOUBLE PRECISION",
           "Boolean": "BOOLEAN", "DateTime": "TIMESTAMP(3)", "Json": "JSONB", "Bytes": "BYTEA",
           "Decimal": "DECIMAL(65,30)"}
NATIVE = {"VarChar": "VARCHAR", "Char": "CHAR", "Text": "TEXT", "Uuid": "UUID", "Integer": "INTEGER",
          "SmallInt": "SMALLINT", "BigInt": "BIGINT", "DoublePrecision": "DOUBLE PRECISION", "Real": "REAL",
          "Timestamp": "TIMESTAMP", "Timestamptz": "TIMESTAMPTZ", "Date": "DATE", "Time": "TIME",
          "JsonB": "JSONB", "Json": "JSON", "Boolean": "BOOLEAN", "Decimal": "DECIMAL", "ByteA": "BYTEA",
          "Xml": "XML", "Inet": "INET", "Bit": "BIT", "VarBit": "VARBIT", "Money": "MONEY", "Oid": "OID"}
CLIENT_SIDE = ("cuid", "uuid", "nanoid", "ulid")  # @default(...) functions Prisma's client evaluates
ACTIONS = {"Cascade": "CASCADE", "Restrict": "RESTRICT", "NoAction": "NO ACTION", "SetNull": "SET NULL",
           "SetDefault": "SET DEFAULT"}


class SchemaError(ValueError):
    pass


@dataclass
class Field:
    name: str
    type: str  # a scalar, an enum, a model, or Unsupported("...")
    optional: bool
    is_list: bool
    attrs: list[tuple[str, str | None]]  # (name, raw arguments) in order: ("default", "now()"), ("id", None)
    column: str = ""

    def attr(self, name: str) -> str | None:
        return next((args or "" for a, args in self.attrs if a == name), None)

    def has(self, name: str) -> bool:
        return any(a == name for a, _ in self.attrs)


@dataclass
class Model:
    name: str
    table: str
    fields: list[Field]
    block: list[tuple[str, str | None]]  # @@id, @@unique, @@index, @@map, ...

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"model {self.name} has no field {name}")


@dataclass
class Column:
    name: str
    sql_type: str  # without SERIAL: the type a value is cast to
    not_null: bool
    default: str | None  # SQL expression the database fills in, or None
    client_default: str | None  # cuid / uuid / ...: filled by Prisma's client on create, not by the database
    updated_at: bool
    prisma_type: str
    is_list: bool
    serial: bool = False
    enum_values: tuple[str, ...] | None = None


@dataclass
class ForeignKey:
    table: str
    columns: list[str]
    target: str
    target_columns: list[str]
    on_delete: str
    on_update: str

    @property
    def name(self) -> str:
        return f"{self.table}_{'_'.join(self.columns)}_fkey"


@dataclass
class Table:
    name: str
    model: str
    columns: dict[str, Column]
    primary_key: list[str] | None
    uniques: list[list[str]]
    foreign_keys: list[ForeignKey]

    @property
    def identity(self) -> list[str]:
        """The columns Prisma's findUnique would look a row up by: the primary key, else the first unique."""
        if self.primary_key:
            return self.primary_key
        if self.uniques:
            return self.uniques[0]
        raise SchemaError(f"table {self.name} has neither a primary key nor a unique constraint")


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and line.startswith("//", i):
            return line[:i]
    return line


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on sep outside brackets, parentheses and string literals."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def _attributes(text: str, where: str) -> list[tuple[str, str | None]]:
    """`@id @default(cuid()) @db.VarChar(64)` -> [("id", None), ("default", "cuid()"), ("db.VarChar", "64")]."""
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = re.compile(r"@@?([A-Za-z_][\w.]*)").match(text, i)
        if not m:
            raise SchemaError(f"{where}: cannot read attributes {text[i:]!r}")
        name, i = m.group(1), m.end()
        args = None
        if i < len(text) and text[i] == "(":
            depth, quoted, j = 0, False, i
            while j < len(text):
                ch = text[j]
                if ch == '"' and text[j - 1] != "\\":
                    quoted = not quoted
                elif not quoted and ch == "(":
                    depth += 1
                elif not quoted and ch == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth:
                raise SchemaError(f"{where}: unbalanced parentheses in {text!r}")
            args, i = text[i + 1:j], j + 1
        out.append((name, args))
    return out


def _args(raw: str | None) -> tuple[list[str], dict[str, str]]:
    """Positional and named arguments of an attribute: `[a, b], name: "x"`."""
    positional, named = [], {}
    for part in _split_top(raw or ""):
        m = re.match(r"^([A-Za-z_]\w*)\s*:\s*(.*)$", part, re.DOTALL)
        if m:
            named[m.group(1)] = m.group(2).strip()
        else:
            positional.append(part)
    return positional, named


def _names(raw: str) -> list[str]:
    """`[a, b]` or a bare `a` (as in `@@unique(emailUnsubscribeCode)`); sort orders such as `a(sort: Desc)` drop."""
    raw = raw.strip()
    if raw.startswith("["):
        raw = raw[1:-1]
    return [re.sub(r"\(.*\)$", "", p).strip() for p in _split_top(raw)]


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"') and raw.endswith('"'):
        return json.loads(raw)
    return raw


FIELD = re.compile(r'^([A-Za-z_]\w*)\s+(Unsupported\("[^"]*"\)|[A-Za-z_]\w*)(\[\])?(\?)?\s*(.*)$')


@dataclass
class Schema:
    models: dict[str, Model]
    enums: dict[str, list[str]]
    extensions: list[str]

    # -- what the tables are ----------------------------------------------------------

    def is_relation(self, f: Field) -> bool:
        return f.type in self.models

    def table_of(self, model: str) -> str:
        return self.models[model].table

    def tables(self, available_extensions: set[str] = frozenset()) -> dict[str, Table]:
        return {m.table: self._table(m, available_extensions) for m in self.models.values()}

    def table(self, name: str, available_extensions: set[str] = frozenset()) -> Table:
        for m in self.models.values():
            if m.table == name:
                return self._table(m, available_extensions)
        raise SchemaError(f"no table {name}")

    def _sql_type(self, f: Field) -> str:
        native = next(((a, args) for a, args in f.attrs if a.startswith("db.")), None)
        if f.type.startswith("Unsupported("):
            base = _unquote(f.type[len("Unsupported("):-1])
        elif f.type in self.enums:
            base = f'"{f.type}"'
        elif native:
            base = NATIVE.get(native[0][3:], native[0][3:].upper()) + (f"({native[1]})" if native[1] else "")
        elif f.type in SCALARS:
            base = SCALARS[f.type]
        else:
            raise SchemaError(f"field {f.name}: unknown type {f.type}")
        return base + ("[]" if f.is_list else "")

    def _default(self, f: Field, sql_type: str) -> tuple[str | None, str | None, bool]:
        """(database default, client-side default, serial) of a field."""
        raw = f.attr("default")
        if raw is None:
            return None, None, False
        raw = raw.strip()
        call = re.match(r"^(\w+)\((.*)\)$", raw, re.DOTALL)
        if call:
            fn, inner = call.groups()
            if fn == "now":
                return "CURRENT_TIMESTAMP", None, False
            if fn == "autoincrement":
                return None, None, True
            if fn == "dbgenerated":
                return (_unquote(inner) if inner.strip() else None), None, False
            if fn in CLIENT_SIDE:
                return None, fn, False
            raise SchemaError(f"field {f.name}: unknown default function {fn}")
        if raw.startswith("["):
            items = [self._literal(f, v) for v in _split_top(raw[1:-1])]
            return f"ARRAY[{', '.join(items)}]::{sql_type}", None, False
        return self._literal(f, raw), None, False

    def _literal(self, f: Field, raw: str) -> str:
        if raw.startswith('"'):
            return _sql_string(_unquote(raw))
        if f.type in self.enums:
            if raw not in self.enums[f.type]:
                raise SchemaError(f"field {f.name}: {raw} is not a value of enum {f.type}")
            return f"'{raw}'"
        if raw in ("true", "false") or re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", raw):
            return raw
        raise SchemaError(f"field {f.name}: cannot read default {raw!r}")

    def _table(self, m: Model, available_extensions: set[str]) -> Table:
        columns: dict[str, Column] = {}
        for f in m.fields:
            if self.is_relation(f) or f.has("ignore"):
                continue
            if f.type.startswith("Unsupported("):
                base = re.match(r"\w+", _unquote(f.type[len("Unsupported("):-1])).group(0)
                if base not in available_extensions:
                    continue  # e.g. pgvector's vector where the extension is not installed: no import writes it
            sql_type = self._sql_type(f)
            default, client, serial = self._default(f, sql_type)
            columns[f.column] = Column(f.column, sql_type, not_null=not f.optional and not f.is_list,
                                       default=default, client_default=client, updated_at=f.has("updatedAt"),
                                       prisma_type=f.type, is_list=f.is_list, serial=serial,
                                       enum_values=tuple(self.enums[f.type]) if f.type in self.enums else None)
        col = {f.name: f.column for f in m.fields}
        primary = next(([col[n] for n in _names(_args(a)[0][0])] for name, a in m.block if name == "id"), None)
        if primary is None:
            primary = next(([f.column] for f in m.fields if f.has("id")), None)
        uniques = [[f.column] for f in m.fields if f.has("unique")]
        uniques += [[col[n] for n in _names(_args(a)[0][0])] for name, a in m.block if name == "unique"]
        fks = []
        for f in m.fields:
            rel = f.attr("relation")
            if not self.is_relation(f) or rel is None:
                continue
            _, named = _args(rel)
            if "fields" not in named:
                continue  # the other side of the relation: no column here
            target = self.models[f.type]
            tcol = {g.name: g.column for g in target.fields}
            default_delete = "SetNull" if f.optional else "Restrict"
            fks.append(ForeignKey(m.table, [col[n] for n in _names(named["fields"])], target.table,
                                  [tcol[n] for n in _names(named["references"])],
                                  ACTIONS[named.get("onDelete", default_delete)],
                                  ACTIONS[named.get("onUpdate", "Cascade")]))
        return Table(m.table, m.name, columns, primary, uniques, fks)

    # -- the DDL ----------------------------------------------------------------------

    def ddl(self, available_extensions: set[str] = frozenset()) -> str:
        """CREATE statements as Prisma's migrations would write them: types, tables, unique indexes, then FKs."""
        out = [f'CREATE EXTENSION IF NOT EXISTS "{e}";' for e in self.extensions if e in available_extensions]
        for name, values in self.enums.items():
            out.append(f'CREATE TYPE "{name}" AS ENUM ({", ".join(_sql_string(v) for v in values)});')
        tables = self.tables(available_extensions)
        for t in tables.values():
            lines = []
            for c in t.columns.values():
                if c.serial:
                    kind = "BIGSERIAL" if c.sql_type == "BIGINT" else "SERIAL"
                    lines.append(f'"{c.name}" {kind}' + (" NOT NULL" if c.not_null else ""))
                    continue
                lines.append(f'"{c.name}" {c.sql_type}' + (" NOT NULL" if c.not_null else "")
                             + (f" DEFAULT {c.default}" if c.default is not None else ""))
            if t.primary_key:
                lines.append(f'CONSTRAINT "{t.name}_pkey" PRIMARY KEY ({_quoted(t.primary_key)})')
            out.append(f'CREATE TABLE "{t.name}" (\n    ' + ",\n    ".join(lines) + "\n);")
        for t in tables.values():
            for u in t.uniques:
                out.append(f'CREATE UNIQUE INDEX "{t.name}_{"_".join(u)}_key" ON "{t.name}" ({_quoted(u)});')
        for t in tables.values():
            for fk in t.foreign_keys:
                out.append(f'ALTER TABLE "{t.name}" ADD CONSTRAINT "{fk.name}" FOREIGN KEY ({_quoted(fk.columns)}) '
                           f'REFERENCES "{fk.target}" ({_quoted(fk.target_columns)}) '
                           f"ON DELETE {fk.on_delete} ON UPDATE {fk.on_update};")
        return "\n".join(out) + "\n"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quoted(names: list[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def parse_schema(text: str) -> Schema:
    """Models, enums and the datasource's extensions of a schema.prisma (generators are skipped)."""
    models, enums, extensions = {}, {}, []
    lines = [_strip_comment(line).strip() for line in text.splitlines()]
    i = 0
    while i < len(lines):
        head = lines[i]
        i += 1
        if not head:
            continue
        m = re.match(r"^(model|enum|generator|datasource|view|type)\s+(\w+)\s*\{$", head)
        if not m:
            raise SchemaError(f"line {i}: cannot read {head!r}")
        kind, name = m.groups()
        body = []
        while i < len(lines) and lines[i] != "}":
            if lines[i]:
                body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if kind == "enum":
            values = []
            for _, line in body:
                if line.startswith("@@"):
                    continue
                values.append(line.split()[0])
            enums[name] = values
        elif kind == "datasource":
            for _, line in body:
                ext = re.match(r"^extensions\s*=\s*\[(.*)\]$", line)
                if ext:
                    extensions = [re.match(r"\w+", e).group(0) for e in _split_top(ext.group(1))]
        elif kind == "model":
            fields, block = [], []
            for n, line in body:
                if line.startswith("@@"):
                    block += _attributes(line, f"line {n}")
                    continue
                fm = FIELD.match(line)
                if not fm:
                    raise SchemaError(f"line {n}: cannot read field {line!r}")
                fname, ftype, is_list, optional, rest = fm.groups()
                attrs = _attributes(rest, f"line {n}")
                f = Field(fname, ftype, bool(optional), bool(is_list), attrs)
                mapped = f.attr("map")
                f.column = _unquote(_args(mapped)[0][0]) if mapped else fname
                fields.append(f)
            mapped = next((a for n_, a in block if n_ == "map"), None)
            models[name] = Model(name, _unquote(_args(mapped)[0][0]) if mapped else name, fields, block)
        # generator, view, type: nothing for the tables
    schema = Schema(models, enums, extensions)
    for model in models.values():  # every type must be known
        for f in model.fields:
            if not (f.type in SCALARS or f.type in enums or f.type in models or f.type.startswith("Unsupported(")):
                raise SchemaError(f"model {model.name}, field {f.name}: unknown type {f.type}")
    return schema


def load_schema(path: Path | None = None) -> Schema:
    path = path or find_schema()
    if path is None:
        raise FileNotFoundError("Neuronpedia's schema.prisma is not found; set XC_NEURONPEDIA_SCHEMA")
    return parse_schema(Path(path).read_text())


# -- a throw-away server ------------------------------------------------------------------

class SqlError(RuntimeError):
    """An error psql reported: the database's own text (ERROR, DETAIL lines)."""


def find_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(re.findall(r"\d+", p)[0]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, listening only on a unix socket in that folder."""

    PORT = 5432  # only names the socket file; there is no TCP listener
    USER = "xc"

    def __init__(self, bin_dir: Path):
        self.bin = Path(bin_dir)
        self.psql_path = shutil.which("psql") or str(self.bin / "psql")
        self.dir: Path | None = None
        self.as_user: list[str] = []

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError(NOT_INSTALLED)
        server = cls(bin_dir)
        server._start()
        return server

    def _run_as(self) -> list[str]:
        """PostgreSQL refuses to run as root: then the server runs as the postgres system user."""
        if os.geteuid() != 0:
            return []
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise FileNotFoundError("running as root and there is no 'postgres' user to run PostgreSQL as") from None
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--"]
        return ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"']

    def _start(self) -> None:
        self.as_user = self._run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="xc-pg-", dir=self._memory_folder()))
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._server_cmd([str(self.bin / "initdb"), "-D", str(data), "-U", self.USER, "--auth=trust", "-E", "UTF8",
                          "--locale=C", "-N"])
        with open(data / "postgresql.conf", "a") as conf:  # fast and private: nothing survives the session
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.dir}'\nport = {self.PORT}\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 20\n"
                       "max_wal_size = 128MB\nmin_wal_size = 32MB\n")
        self._server_cmd([str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"), "-w",
                          "-t", "60", "start"])

    @staticmethod
    def _memory_folder() -> str | None:
        """/dev/shm where it has room (a test's databases are a few hundred MB of writes), else the temp folder."""
        try:
            if shutil.disk_usage("/dev/shm").free > 2 << 30 and os.access("/dev/shm", os.W_OK):
                return "/dev/shm"
        except OSError:
            pass
        return None

    def _server_cmd(self, cmd: list[str]) -> None:
        done = subprocess.run(self.as_user + cmd, check=False, capture_output=True, text=True, cwd=self.dir)
        if done.returncode:
            log = self.dir / "server.log"
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               + (log.read_text() if log.exists() else ""))

    def stop(self) -> None:
        if self.dir is None:
            return
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                                       "-w", "stop"], check=False, capture_output=True, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def psql_command(self, database: str) -> list[str]:
        return [self.psql_path, "-X", "-q", "-A", "-t", "-F", "\x1f", "-h", str(self.dir), "-p", str(self.PORT),
                "-U", self.USER, "-d", database]

    ENV: ClassVar[dict[str, str]] = {"PGOPTIONS": "-c client_min_messages=warning", "PGCONNECT_TIMEOUT": "20"}

    def psql(self, database: str, sql: str) -> list[list[str]]:
        """Run SQL in a psql of its own (stopping at the first error); the rows printed, fields as text."""
        done = subprocess.run(self.psql_command(database) + ["-v", "ON_ERROR_STOP=1", "-f", "-"], check=False,
                              input=sql, capture_output=True, text=True, env={**os.environ, **self.ENV})
        if done.returncode:
            lines = [re.sub(r"^psql:[^:]*:\d+:\s*", "", line) for line in done.stderr.splitlines()]
            raise SqlError("\n".join(line for line in lines if line.strip()) or f"psql exited {done.returncode}")
        return [line.split("\x1f") for line in done.stdout.splitlines() if line]

    def create_database(self, name: str, template: str | None = None) -> Database:
        tpl = f' TEMPLATE "{template}"' if template else ""
        self.psql("postgres", f'CREATE DATABASE "{name}"{tpl};')
        return Database(self, name)

    def drop_database(self, name: str) -> None:
        self.psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')

    def available_extensions(self) -> set[str]:
        return {r[0] for r in self.psql("postgres", "SELECT name FROM pg_available_extensions;")}


class Session:
    """One psql connection kept open for many statements (a psql per statement costs a connection each)."""

    def __init__(self, server: PostgresServer, database: str):
        self.proc = subprocess.Popen(server.psql_command(database) + ["-v", "ON_ERROR_STOP=0", "-f", "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, encoding="utf-8", env={**os.environ, **server.ENV})
        self.count = 0

    def sql(self, text: str) -> list[list[str]]:
        """One or more statements, each ending in ';'. The rows printed, or SqlError with the database's text."""
        if not text.rstrip().endswith(";"):
            raise ValueError("SQL sent to a session must end with ';'")
        self.count += 1
        marker = f"-- xc statement {self.count} done --"
        self.proc.stdin.write(text.rstrip() + f"\n\\echo '{marker}'\n")
        self.proc.stdin.flush()
        rows, error = [], []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SqlError("psql ended: " + "\n".join(error or ["\x1f".join(r) for r in rows]))
            line = line.rstrip("\n")
            if line == marker:
                break
            said = re.match(r"^psql:[^:]*:\d+:\s*(.*)$", line)
            if said and said.group(1).startswith(("ERROR:", "FATAL:")) or error and not said:
                error.append(said.group(1) if said else line)
            elif line and not said:
                rows.append(line.split("\x1f"))
        if error:
            raise SqlError("\n".join(error))
        return rows

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Database:
    server: PostgresServer
    name: str

    def sql(self, text: str) -> list[list[str]]:
        return self.server.psql(self.name, text)

    def session(self) -> Session:
        return Session(self.server, self.name)

    def count(self, table: str) -> int:
        return int(self.sql(f'SELECT count(*) FROM "{table}";')[0][0])

    def counts(self, tables) -> dict[str, int]:
        rows = self.sql("".join(f'SELECT count(*) FROM "{t}";' for t in tables))
        return {t: int(r[0]) for t, r in zip(tables, rows)}

    def create_user(self, user_id: str, name: str | None = None) -> None:
        """A Neuronpedia user, as Prisma would create it (emailUnsubscribeCode is a client-side cuid)."""
        row = {"id": user_id, "name": name or f"user-{user_id}", "emailUnsubscribeCode": cuid()}
        self.sql(f'INSERT INTO "User" ("id", "name", "emailUnsubscribeCode") '
                 f"SELECT * FROM jsonb_to_record({_literal(json.dumps(row))}::jsonb) "
                 f'AS x("id" text, "name" text, "emailUnsubscribeCode" text);')


def cuid() -> str:
    return "c" + secrets.token_hex(12)


def _literal(text: str) -> str:
    """Text as a dollar-quoted SQL literal (a tag the text does not hold)."""
    tag = "xc"
    while f"${tag}$" in text:
        tag = "xc" + secrets.token_hex(4)
    return f"${tag}${text}${tag}$"


# -- the importer ----------------------------------------------------------------------------

class RowError(ValueError):
    """A row Prisma's client would refuse before it reaches the database."""


@dataclass
class ImportResult:
    inserted: Counter = field(default_factory=Counter)  # rows per table
    skipped: Counter = field(default_factory=Counter)  # rows per table that existed already (by key or id)
    read: Counter = field(default_factory=Counter)  # rows per table in the files the listing showed
    errors: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # files past the listing limit, never read

    def __iadd__(self, other: ImportResult) -> Self:
        self.inserted += other.inserted
        self.skipped += other.skipped
        self.read += other.read
        self.errors += other.errors
        self.unlisted += other.unlisted
        return self

    def summary(self) -> dict:
        return {"inserted": dict(self.inserted), "skipped": dict(self.skipped), "read": dict(self.read),
                "errors": self.errors, "unlisted": self.unlisted}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # JavaScript's JSON.parse refuses NaN and Infinity


def read_json_line(line: str):
    return json.loads(line, parse_constant=_no_constant)


def list_keys(folder: Path, limit: int = LIST_LIMIT) -> tuple[list[Path], list[Path]]:
    """The files of one prefix in an object store's order (by name, bytewise), split at the listing limit."""
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name.encode()) \
        if folder.is_dir() else []
    return files[:limit], files[limit:]


def import_export(db: Database, root: Path, schema: Schema, limit: int = LIST_LIMIT) -> ImportResult:
    """Import every v1/<modelId>/<sourceId>/ folder of an export, in name order. An error stops that folder
    (as the exception would stop the importer's request); the other folders still import."""
    root = Path(root)
    v1 = root / "v1" if (root / "v1").is_dir() else root
    result = ImportResult()
    tables = schema.tables()
    with db.session() as session:
        for model_dir in sorted(p for p in v1.iterdir() if p.is_dir()):
            for source_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                result += import_source(session, source_dir, tables, limit, str(source_dir.relative_to(v1.parent)))
    return result


def import_source(db: Database | Session, folder: Path, tables: dict[str, Table], limit: int,
                  where: str) -> ImportResult:
    result = ImportResult()
    for filename, table in METADATA:
        path = folder / filename
        if not path.exists():
            if table != "SourceRelease":
                result.errors.append(f"{where}/{filename}: missing")
                return result
            continue
        try:
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            row = read_json_line(lines[0])
            result.read[table] += 1
            created = create_if_absent(db, tables[table], row)
        except (SqlError, RowError, ValueError, IndexError) as e:
            if table == "SourceRelease":
                continue  # the importer ignores errors on the release
            result.errors.append(f"{where}/{filename}: {e}")
            return result
        (result.inserted if created else result.skipped)[table] += 1
    for sub, table in BATCHES:
        listed, unlisted = list_keys(folder / sub, limit)
        result.unlisted += [f"{where}/{sub}/{p.name}" for p in unlisted]
        for path in listed:
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    rows = [read_json_line(line) for line in f if line.strip()]
                if not rows:
                    continue
                result.read[table] += len(rows)
                n = insert_batch(db, tables[table], rows)
            except (SqlError, ValueError, TypeError, OSError, EOFError) as e:
                result.errors.append(f"{where}/{sub}/{path.name}: {e}")
                return result
            result.inserted[table] += n
            result.skipped[table] += len(rows) - n
    return result


# Prisma's client checks each value against the field's type before a create reaches the database.
def _check_value(column: Column, value, key: str) -> None:
    if value is None:
        if column.not_null:
            raise RowError(f"{key} must not be null")
        return
    if column.is_list:
        if not isinstance(value, list):
            raise RowError(f"{key} must be a list")
        for v in value:
            _check_scalar(column, v, key)
        return
    _check_scalar(column, value, key)


def _check_scalar(column: Column, value, key: str) -> None:
    t = column.prisma_type
    ok = {"String": isinstance(value, str), "Int": isinstance(value, int) and not isinstance(value, bool),
          "BigInt": isinstance(value, int) and not isinstance(value, bool),
          "Float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "Decimal": isinstance(value, (int, float, str)) and not isinstance(value, bool),
          "Boolean": isinstance(value, bool), "Json": True, "Bytes": isinstance(value, str),
          "DateTime": isinstance(value, str) and _is_iso(value)}.get(t, value in (column.enum_values or ()))
    if not ok:
        raise RowError(f"{key}: {value!r} is not a valid {t}")


def _is_iso(text: str) -> bool:
    return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", text))


def create_if_absent(db: Database | Session, table: Table, row: dict) -> bool:
    """Prisma's findUnique then create with the row as given. True when the row was created."""
    if not isinstance(row, dict):
        raise RowError("the line is not a JSON object")
    unknown = [k for k in row if k not in table.columns]
    if unknown:
        raise RowError(f"Unknown argument(s) {', '.join(unknown)}: not scalar columns of {table.name}")
    for key, value in row.items():
        _check_value(table.columns[key], value, key)
    missing = [c.name for c in table.columns.values()
               if c.not_null and c.default is None and c.client_default is None and not c.updated_at
               and not c.serial and c.name not in row]
    if missing:
        raise RowError(f"Argument(s) {', '.join(missing)} missing for {table.name}")
    key = table.identity
    if any(row.get(k) is None for k in key):
        raise RowError(f"{table.name} is looked up by {', '.join(key)}, which the line does not give")
    full = dict(row)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    for c in table.columns.values():  # what Prisma's client fills in on create
        if c.name not in full and c.client_default:
            full[c.name] = cuid()
        elif c.name not in full and c.updated_at:
            full[c.name] = now
    cols = list(full)
    found = " AND ".join(f't."{k}" = x."{k}"' for k in key)
    sql = (f'WITH x AS (SELECT * FROM jsonb_populate_record(NULL::"{table.name}", '
           f"{_literal(json.dumps(full, allow_nan=False))}::jsonb)), "
           f'ins AS (INSERT INTO "{table.name}" ({_quoted(cols)}) SELECT {_quoted(cols)} FROM x '
           f'WHERE NOT EXISTS (SELECT 1 FROM "{table.name}" t WHERE {found}) RETURNING 1) '
           f"SELECT count(*) FROM ins;")
    return int(db.sql(sql)[0][0]) == 1


def insert_batch(db: Database | Session, table: Table, rows: list[dict]) -> int:
    """The importer's bulk insert: columns = line 1's keys that are table columns, cast by jsonb_to_recordset,
    ON CONFLICT DO NOTHING. The number of rows inserted."""
    if not isinstance(rows[0], dict):
        raise TypeError("line 1 is not a JSON object")
    cols = [k for k in rows[0] if k in table.columns]
    spec = ", ".join(f'"{c}" {table.columns[c].sql_type}' for c in cols)
    sql = (f'WITH ins AS (INSERT INTO "{table.name}" ({_quoted(cols)}) SELECT {_quoted(cols)} '
           f"FROM jsonb_to_recordset({_literal(json.dumps(rows, allow_nan=False))}::jsonb) AS x({spec}) "
           f"ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM ins;")
    return int(db.sql(sql)[0][0])


def export_lines(root: Path) -> Counter:
    """Rows per table in an export's batch files, every file counted (the listing limit aside)."""
    counts = Counter()
    v1 = Path(root) / "v1"
    for sub, table in BATCHES:
        for path in v1.glob(f"*/*/{sub}/*"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                counts[table] += sum(1 for line in f if line.strip())
    return counts
