"""Purge by tag with real WordPress (issue 11, "Tests": the real WordPress end-to-end).

Debian's ``wordpress`` on ``php-fpm`` as a site user, a MariaDB of the test's own, nginx with a FastCGI
cache in front and the must-use plugin ``contrib/wordpress/cachesvc-tags.php`` (harness/wordpress.py).
Changes are made through WordPress's API from ``php-cli`` as the site user.

- Pages carry their tags in nginx's cache file, hidden from visitors; the site user cannot delete them.
- What the plugin sends, against a recording stand-in for the daemon: the exact line, one connection
  per line, one read of the reply; which changes purge and which do not; soft purges, the cache path's
  constants; the SpinupWP plugin's whole-site purge turned off for the post types purged by tag.
- Against the real daemon: an update or a publish makes the post's page, the home page and its category
  page MISS while an unrelated post's page stays a HIT; trashing purges the category page; approving a
  comment purges the post's page; the daemon logs the tag purge; a soft purge expires instead.
- With the daemon down, a change raises no PHP warning (and the log would show one).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.daemon import free_port
from harness.wordpress import HOST, WordPress, ensure_packages, problems, value

REPORT = """add_action( 'cachesvc_tags_purged', function ( $line, $ok ) {
	echo "\\n@@purged@@", json_encode( array( $line, $ok ) ), "\\n";
}, 10, 2 );
"""
names = (f"{n}" for n in itertools.count(1))


@pytest.fixture(scope="module")
def wp() -> Iterator[WordPress]:
    reason = ensure_packages()
    if reason:
        pytest.skip(reason)
    stack = WordPress()
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def daemon(wp: WordPress) -> WordPress:
    """The stack with ``twistd cachesvc`` running, tag purges on."""
    wp.use_daemon()
    return wp


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


class Recorder:
    """A stand-in for the daemon: records what each connection sent until the client closed it, and
    answers the first line with *reply* (several writes, *pause* seconds apart)."""

    def __init__(self, reply: tuple[bytes, ...] = (b"Purge: Success\n",), pause: float = 0.3) -> None:
        self.reply, self.pause = reply, pause
        self.connections: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.settimeout(10)
            try:
                while b"\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                for i, part in enumerate(self.reply):
                    time.sleep(self.pause if i else 0)
                    conn.sendall(part)
                while chunk := conn.recv(4096):
                    data += chunk
            except OSError:
                pass  # the client closed before the whole reply was written
        with self._lock:
            self.connections.append(data)

    def finished(self) -> list[bytes]:
        """What each connection sent, once the client closed them all (call it when the client is done)."""
        while True:
            threads = list(self._threads)
            for thread in threads:
                thread.join(15)
            time.sleep(0.1)  # a connection the kernel took and accept() did not return yet
            if len(self._threads) == len(threads):
                with self._lock:
                    return list(self.connections)

    def close(self) -> None:
        self.sock.close()


def run(wp: WordPress, body: str, port: int | None = None, **constants: Any) -> tuple[Any, list[tuple[str, bool]]]:
    """*body* run in WordPress (the plugin sending to *port*): its result, and each purge line the plugin
    sent with whether it reported success."""
    if port is not None:
        constants["CACHESVC_PORT"] = port
    code = REPORT + f"$r = ( function () {{ {body}\n }} )();\necho \"\\n@@result@@\", json_encode( $r ), \"\\n\";"
    done = wp.php(code, constants)
    assert not problems(done.stderr), done.stderr
    result = json.loads(done.stdout.split("@@result@@", 1)[1].split("\n", 1)[0])
    return result, [tuple(json.loads(m)) for m in re.findall(r"@@purged@@(.*)", done.stdout)]


def world(wp: WordPress) -> dict[str, Any]:
    """Two posts in two categories of their own, with the paths of their pages and category pages."""
    n = next(names)
    x, y = wp.category(f"Cat X{n}"), wp.category(f"Cat Y{n}")
    a, b = wp.post(f"Post A{n}", [x]), wp.post(f"Post B{n}", [y])
    links = f"get_permalink( {a} ), get_permalink( {b} ), get_category_link( {x} ), get_category_link( {y} )"
    pa, pb, px, py = wp.wp(f"return array_map( 'wp_make_link_relative', [ {links} ] );")
    return {"n": n, "x": x, "y": y, "a": a, "b": b, "pa": pa, "pb": pb, "px": px, "py": py}


def warm(wp: WordPress, *paths: str) -> None:
    for path in paths:
        wp.until_hit(HOST, path)


# --- what pages carry ----------------------------------------------------------------------------------


def test_pages_are_cached_with_their_tags_hidden_from_visitors(wp: WordPress) -> None:
    w = world(wp)
    status, headers, body = wp.fetch(w["pa"])
    assert status == 200 and f"Post A{w['n']}" in body
    assert "x-cache-tags" not in headers  # fastcgi_hide_header
    warm(wp, w["pa"], "/", w["px"], "/author/admin/")
    assert sorted(wp.tags_of(w["pa"]) or []) == sorted([f"post-{w['a']}", f"term-{w['x']}"])
    home = wp.tags_of("/") or []
    assert {"home", f"post-{w['a']}", f"post-{w['b']}", f"term-{w['x']}", f"term-{w['y']}"} <= set(home)
    category = wp.tags_of(w["px"]) or []
    assert {f"term-{w['x']}", f"post-{w['a']}"} <= set(category) and f"post-{w['b']}" not in category
    assert "author-1" in (wp.tags_of("/author/admin/") or [])


def test_secondary_loops_tag_the_posts_they_show(wp: WordPress) -> None:
    page = wp.post(f"Page {next(names)}", [], post_type="page")
    latest = wp.wp("return wp_list_pluck( get_posts( array( 'numberposts' => 3 ) ), 'ID' );")
    path = wp.path(f"get_permalink( {page} )")
    wp.until_hit(HOST, path)
    assert {f"post-{page}", *(f"post-{i}" for i in latest)} <= set(wp.tags_of(path) or [])


def test_a_page_with_too_many_tags_is_not_cached(wp: WordPress) -> None:
    """Past CACHESVC_TAGS_MAX_BYTES (3,000) the page goes out with X-Accel-Expires: 0 (nginx's header buffer
    must hold every header); below it, tags added by the cachesvc_page_tags filter are stored."""
    w = world(wp)
    try:
        wp.wp(f"return update_option( 'cachesvc_test_page_tags', {value(['extra-1', 'extra-2'])} );")
        wp.until_hit(HOST, w["pa"])
        assert {f"post-{w['a']}", "extra-1", "extra-2"} <= set(wp.tags_of(w["pa"]) or [])
        many = [f"extra-tag-{i:04}" for i in range(300)]
        wp.wp(f"return update_option( 'cachesvc_test_page_tags', {value(many)} );")
        assert [wp.status(HOST, w["pb"]) for _ in range(3)] == ["MISS"] * 3
        assert not wp.file(HOST, w["pb"]).exists()
    finally:
        wp.wp("return delete_option( 'cachesvc_test_page_tags' );")


@pytest.mark.skipif(os.geteuid() != 0, reason="the site user is ourselves unless we are root")
def test_the_site_user_cannot_delete_nginx_cache_files(wp: WordPress) -> None:
    w = world(wp)
    wp.until_hit(HOST, w["pa"])
    target = wp.file(HOST, w["pa"])
    assert wp.user and target.stat().st_uid != wp.user[0]
    done = wp.php(f"var_export( @unlink( '{target}' ) );", boot=False)
    assert done.stdout == "false" and target.exists()


# --- what the plugin sends -------------------------------------------------------------------------------


def test_one_line_per_request_one_connection_exact_format(wp: WordPress, recorder: Recorder) -> None:
    w = world(wp)
    body = (
        f"wp_update_post( array( 'ID' => {w['a']}, 'post_title' => 'A, again' ) );"
        f"wp_update_post( array( 'ID' => {w['a']}, 'post_title' => 'A, once more' ) );"
        f"wp_update_post( array( 'ID' => {w['b']}, 'post_title' => 'B, again' ) ); return true;"
    )
    _, reported = run(wp, body, recorder.port)
    line = f"tag:{wp.zone(HOST)} post-{w['a']},term-{w['x']},author-1,home,archive-post,post-{w['b']},term-{w['y']}"
    assert reported == [(line, True)]
    assert recorder.finished() == [line.encode() + b"\n"]  # one connection, one line, then closed


def test_old_and_new_terms_and_ancestors_are_purged(wp: WordPress, recorder: Recorder) -> None:
    w = world(wp)
    child = wp.wp(f"return wp_insert_term( 'Child {w['n']}', 'category', array( 'parent' => {w['y']} ) )['term_id'];")
    _, reported = run(wp, f"return wp_update_post( array( 'ID' => {w['a']}, 'post_category' => array( {child} ) ) );",
                      recorder.port)
    tags = reported[0][0].split(" ", 1)[1].split(",")
    assert {f"term-{w['x']}", f"term-{child}", f"term-{w['y']}"} <= set(tags)


def test_which_changes_purge(wp: WordPress, recorder: Recorder) -> None:
    cat = wp.category(f"Cat W{next(names)}")

    def lines(body: str) -> list[str]:
        return [line for line, _ in run(wp, body, recorder.port)[1]]

    fields = f"'post_title' => 'changes', 'post_status' => 'draft', 'post_author' => 1, 'post_category' => [ {cat} ]"
    draft, reported = run(wp, f"return wp_insert_post( [ {fields} ] );", recorder.port)
    comment = "wp_insert_comment( [ 'comment_post_ID' => %d, 'comment_approved' => 0, 'comment_content' => 'hm' ] )"
    secret = "register_post_type( 'secret', [ 'public' => false ] );"
    silent = {
        "a draft created": [line for line, _ in reported],
        "a draft updated": lines(f"wp_update_post( [ 'ID' => {draft}, 'post_content' => 'x' ] );"),
        "an unapproved comment": lines(comment % draft + ";"),
        "a post type that is not public": lines(
            secret + "wp_insert_post( [ 'post_type' => 'secret', 'post_title' => 's', 'post_status' => 'publish' ] );"
        ),
    }
    assert silent == dict.fromkeys(silent, [])
    loud = {  # in this order: each acts on the post as the one before left it
        "published": f"wp_publish_post( {draft} );",
        "updated": f"wp_update_post( [ 'ID' => {draft}, 'post_content' => 'y' ] );",
        "a comment approved": f"wp_set_comment_status( {comment % draft}, 'approve' );",
        "unpublished": f"wp_update_post( [ 'ID' => {draft}, 'post_status' => 'draft' ] );",
    }
    for what, body in loud.items():
        assert lines(body) == [f"tag:{wp.zone(HOST)} post-{draft},term-{cat},author-1,home,archive-post"], what
    for what, body in {"trashed": "wp_trash_post( %d );", "deleted": "wp_delete_post( %d, true );"}.items():
        post = wp.post(f"Post {what}", [cat])
        assert [line.split(" ")[1].split(",")[0] for line in lines(body % post)] == [f"post-{post}"], what
    trashed = wp.post("Post deleted from the trash", [cat])
    lines(f"wp_trash_post( {trashed} );")
    assert lines(f"wp_delete_post( {trashed}, true );") == []


def test_soft_purges_and_the_cache_path_constants(wp: WordPress, recorder: Recorder) -> None:
    w = world(wp)
    change = f"wp_update_post( array( 'ID' => {w['a']}, 'post_content' => 'soft' ) );"
    _, soft = run(wp, change, recorder.port, CACHESVC_SOFT_PURGE=True)
    assert soft[0][0].startswith(f"soft:tag:{wp.zone(HOST)} post-{w['a']},")
    _, other = run(wp, change, recorder.port, CACHESVC_CACHE_PATH="/cache/other.example/")
    assert other[0][0].startswith(f"tag:/cache/other.example post-{w['a']},")
    _, none = run(wp, change, recorder.port, CACHESVC_CACHE_PATH="")
    assert none == []
    assert len(recorder.finished()) == 2


@pytest.mark.parametrize(
    ("reply", "success"),
    [((b"Purge: Success\n",), True), ((b"Purge: Error\n",), False), ((b"Purge: ", b"Success\n"), False)],
    ids=["success", "error", "split-reply"],
)
def test_one_read_of_the_reply(wp: WordPress, reply: tuple[bytes, ...], success: bool) -> None:
    """A reply split over two writes reads as a failure, as with the SpinupWP client (one fread)."""
    server = Recorder(reply)
    try:
        w = world(wp)
        _, reported = run(wp, f"wp_update_post( array( 'ID' => {w['a']}, 'post_content' => 'r' ) );", server.port)
        assert [ok for _, ok in reported] == [success]
        assert len(server.finished()) == 1
    finally:
        server.close()


def test_the_spinupwp_plugin_whole_site_purge_is_off_for_the_types_purged_by_tag(wp: WordPress) -> None:
    body = (
        "register_post_type( 'book', array( 'public' => true ) );"
        "register_post_type( 'secret', array( 'public' => false ) );"
        "return apply_filters( 'spinupwp_post_types_excluded_from_purge', "
        "array( 'attachment', 'custom_css', 'revision', 'user_request' ) );"
    )
    excluded = set(wp.wp(body))
    assert {"post", "page", "book", "attachment", "custom_css", "revision", "user_request"} <= excluded
    assert not {"secret", "nav_menu_item", "wp_block"} & excluded
    assert set(wp.wp(body, {"CACHESVC_CACHE_PATH": ""})) == {"attachment", "custom_css", "revision", "user_request"}


# --- against the daemon ------------------------------------------------------------------------------------


def test_an_update_purges_its_page_home_and_category_not_an_unrelated_post(daemon: WordPress) -> None:
    wp = daemon
    w = world(wp)
    warm(wp, w["pa"], w["pb"], "/", w["px"], w["py"])
    wp.update_post(w["a"], post_title=f"Post A{w['n']} updated")
    assert wp.status(HOST, w["pa"]) == "MISS"
    assert wp.status(HOST, "/") == "MISS"
    assert wp.status(HOST, w["px"]) == "MISS"
    assert wp.status(HOST, w["pb"]) == "HIT", wp.logs()
    assert wp.status(HOST, w["py"]) == "HIT", wp.logs()
    assert f"Post A{w['n']} updated" in wp.until_hit(HOST, w["pa"])
    wp.wait(lambda: f"tag:{wp.zone(HOST)} post-{w['a']}," in wp.log, 5, "the tag purge logged")


def test_publishing_purges_home_and_the_category_not_an_unrelated_post(daemon: WordPress) -> None:
    wp = daemon
    w = world(wp)
    warm(wp, w["pb"], "/", w["px"], w["py"])
    new = wp.post(f"Post C{w['n']}", [w["x"]], status="draft")
    assert wp.status(HOST, "/") == "HIT"  # a draft purges nothing
    wp.update_post(new, post_status="publish")
    assert wp.status(HOST, "/") == "MISS"
    assert f"Post C{w['n']}" in wp.until_hit(HOST, w["px"])
    assert wp.status(HOST, w["pb"]) == "HIT", wp.logs()
    assert wp.status(HOST, w["py"]) == "HIT", wp.logs()
    path = wp.path(f"get_permalink( {new} )")
    assert wp.status(HOST, path) == "MISS"


def test_trashing_purges_the_category_page(daemon: WordPress) -> None:
    wp = daemon
    w = world(wp)
    assert f"Post A{w['n']}" in wp.until_hit(HOST, w["px"])
    wp.trash_post(w["a"])
    status, _, body = wp.fetch(w["px"])
    assert status == 200 and f"Post A{w['n']}" not in body
    assert wp.fetch(w["pa"])[0] == 404


def test_approving_a_comment_purges_the_post_page(daemon: WordPress) -> None:
    wp = daemon
    w = world(wp)
    comment = wp.comment(w["a"], f"comment {w['n']}")
    assert f"comment {w['n']}" not in wp.until_hit(HOST, w["pa"])
    wp.approve_comment(comment)
    assert wp.status(HOST, w["pa"]) == "MISS"
    assert f"comment {w['n']}" in wp.until_hit(HOST, w["pa"])


def test_a_soft_purge_expires_the_pages(daemon: WordPress) -> None:
    wp = daemon
    w = world(wp)
    warm(wp, w["pa"], w["pb"])
    run(wp, f"wp_update_post( array( 'ID' => {w['a']}, 'post_content' => 'soft' ) );", CACHESVC_SOFT_PURGE=True)
    assert wp.status(HOST, w["pa"]) == "EXPIRED"
    assert wp.status(HOST, w["pb"]) == "HIT"


def test_no_php_warning_when_the_daemon_is_down(wp: WordPress) -> None:
    wp.stop_daemon()
    w = world(wp)
    before = len(wp.php_errors())
    _, reported = run(wp, f"wp_update_post( array( 'ID' => {w['a']}, 'post_content' => 'down' ) );")
    assert [ok for _, ok in reported] == [False]
    assert problems(wp.php_errors()[before:]) == []
    # the log does show a warning: the same connection without the plugin's care
    wp.php(f"stream_socket_client( 'tcp://127.0.0.1:{free_port()}' );")
    assert any("Warning" in line for line in problems(wp.php_errors()[before:]))
