"""rsclip on Citus distributed tables: a coordinator and two workers on loopback ports, each
with citus and rsclip preloaded (Citus 14 built by `make citus` into the PG18 tree).

Citus 14 supports PostgreSQL 16-18 only: on PG15 these tests do not apply, and say so."""
import uuid

import numpy as np
import psycopg
import pytest

from clusters import db_uri, fresh_cluster
from conftest import PG_MAJOR

if PG_MAJOR == "15":
    pytest.skip("Citus 14 supports PostgreSQL 16-18 only: the multi-node tests do not apply to PG15",
                allow_module_level=True)

PORTS = (25530, 25531, 25532)  # coordinator, worker 1, worker 2
DIMS = 32  # the fixture model's embedding size, so text queries can search the table
ROWS = 3000
LISTS = 4
# enable_seqscan = off: shards of ~100 rows would rather be scanned, and the tests are about the
# plans a real table's shards get.
SETTINGS = ["shared_preload_libraries='citus,rsclip'", f"rsclip.probes={LISTS}", "enable_seqscan=off",
            "max_connections=200", "citus.max_adaptive_executor_pool_size=16"]


@pytest.fixture(scope="module")
def citus():
    nodes = [fresh_cluster(f"citus{i}", port, SETTINGS) for i, port in enumerate(PORTS)]
    try:
        for n in nodes:
            with psycopg.connect(db_uri(n), autocommit=True) as c:
                c.execute("CREATE EXTENSION citus")
        coordinator = nodes[0]
        with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
            c.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (PORTS[0],))
            for port in PORTS[1:]:
                c.execute("SELECT citus_add_node('127.0.0.1', %s)", (port,))
            c.execute("CREATE EXTENSION rsclip")  # Citus propagates it to the workers
            c.execute(f"CREATE TABLE tiles (id bigint PRIMARY KEY, kind text, emb embedding({DIMS}))")
            c.execute("SELECT create_distributed_table('tiles', 'id')")
            rng = np.random.default_rng(7)
            data = rng.normal(size=(ROWS, DIMS)).astype(np.float32)
            data /= np.linalg.norm(data, axis=1, keepdims=True)
            with c.cursor().copy("COPY tiles (id, kind, emb) FROM STDIN") as copy:
                for i, v in enumerate(data):
                    copy.write_row((i, ["water", "forest", "urban"][i % 3], "[" + ",".join(map(repr, v.tolist())) + "]"))
            c.execute(f"CREATE INDEX tiles_ip ON tiles USING rsclip (emb embedding_ip_ops) WITH (lists = {LISTS})")
        yield coordinator, data, nodes[1:]
    finally:
        for n in nodes:
            n.stop("immediate")


def exact_top(c, data, text, k=10):
    """The exact top-k by inner product, from the query vector the coordinator encodes."""
    q = np.array(c.execute("SELECT rsclip_encode_text(%s)::real[]", (text,)).fetchone()[0], dtype=np.float32)
    return set(np.argsort(-(data @ q))[:k].tolist())


SEARCH = "SELECT id FROM tiles ORDER BY emb <#> rsclip_encode_text(%s) LIMIT 10"


def test_rsclip_is_on_every_node_and_the_index_on_every_shard(citus):
    coordinator, _, _ = citus
    with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
        versions = c.execute("SELECT result FROM run_command_on_workers("
                             "$$SELECT extversion FROM pg_extension WHERE extname = 'rsclip'$$)").fetchall()
        assert len(versions) == 2 and {v[0] for v in versions} == {c.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'rsclip'").fetchone()[0]}
        shards = c.execute("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'tiles'::regclass").fetchone()[0]
        indexes = c.execute("SELECT sum(result::int) FROM run_command_on_workers("
                            "$$SELECT count(*) FROM pg_indexes WHERE indexdef LIKE '%USING rsclip%' AND indexname LIKE 'tiles_ip_%'$$)").fetchone()[0]
        assert indexes == shards > 1


@pytest.mark.parametrize("in_transaction", [False, True])
def test_search_with_the_cache_on_never_deadlocks_cold_or_warm(citus, in_transaction):
    """The shard tasks of one distributed transaction on one worker all encode the same new
    text: with cache writes that waited on each other's uncommitted row, Citus cancelled the
    transaction as a distributed deadlock. Cold cache (a new text), then warm (the same again)."""
    coordinator, data, _ = citus
    text = f"airport with parked planes {uuid.uuid4().hex}"
    with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
        c.execute("SET statement_timeout = '60s'")
        want = exact_top(c, data, text)
        for temperature in ("cold", "warm"):
            if in_transaction:
                c.execute("BEGIN")
                c.execute(f"SET LOCAL rsclip.probes = {LISTS}")
            got = {r[0] for r in c.execute(SEARCH, (text,))}
            # a second statement in the same distributed transaction, filtered
            filtered = c.execute("SELECT id, kind FROM tiles WHERE kind = 'water' "
                                 "ORDER BY emb <#> rsclip_encode_text(%s) LIMIT 5", (text,)).fetchall()
            if in_transaction:
                c.execute("COMMIT")
            assert got == want, f"{temperature}: {sorted(got)} != {sorted(want)}"
            assert len(filtered) == 5 and all(kind == "water" for _, kind in filtered), filtered


def test_explain_shows_per_shard_index_scans(citus):
    coordinator, _, _ = citus
    with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
        plan = "\n".join(r[0] for r in c.execute(
            "EXPLAIN (COSTS OFF) " + SEARCH.replace("%s", "'harbour'")))
        assert "Custom Scan (Citus Adaptive)" in plan, plan
        assert "Index Scan using tiles_ip_" in plan, plan


ONCE = "SELECT id FROM tiles ORDER BY emb <#> (SELECT rsclip_encode_text(%s)) LIMIT 10"


def test_scalar_subquery_form_encodes_once_on_the_coordinator(citus):
    """`ORDER BY emb <#> (SELECT rsclip_encode_text(...))`: Citus runs the subquery once on the
    coordinator (a distributed subplan) and ships its result to the shards, which use it as the
    index scan's run-time key. Shown by taking the model away from the workers: the plain form
    then fails there, this one does not."""
    coordinator, data, workers = citus
    text = f"harbour with cranes {uuid.uuid4().hex}"
    with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN (COSTS OFF) " + ONCE, (text,)))
        assert "Distributed Subplan" in plan and "Index Scan using tiles_ip_" in plan, plan
        want = exact_top(c, data, text)
    try:
        for w in workers:
            with psycopg.connect(db_uri(w), autocommit=True) as wc:
                wc.execute("ALTER SYSTEM SET rsclip.model_path = '/nonexistent/model'")
                wc.execute("SELECT pg_reload_conf()")
        with psycopg.connect(db_uri(coordinator), autocommit=True) as c:
            c.execute("SET rsclip.cache = off")
            with pytest.raises(psycopg.Error, match="nonexistent"):
                c.execute(SEARCH, (text + " plain",))
            assert {r[0] for r in c.execute(ONCE, (text,))} == want
    finally:
        for w in workers:
            with psycopg.connect(db_uri(w), autocommit=True) as wc:
                wc.execute("ALTER SYSTEM RESET rsclip.model_path")
                wc.execute("SELECT pg_reload_conf()")
