"""Real WordPress behind real nginx, for the end-to-end tests of purge by tag with the must-use plugin
``contrib/wordpress/cachesvc-tags.php``.

:class:`WordPress` is a :class:`harness.nginx.Stack` whose origin is Debian's ``wordpress`` package
(``/usr/share/wordpress``, used as it is) on Debian's ``php-fpm``, with a MariaDB of its own
(:mod:`harness.mariadb`). The site lives in a temporary directory: a front controller and a
``wp-config.php`` of its own (Debian's reads ``/etc/wordpress``), ``wp-content`` with a small classic
theme (a main loop everywhere, approved comments on single pages, a secondary "latest posts" loop on
pages), the must-use plugin and a harness mu-plugin that keeps mail and HTTP requests on the machine.
php-fpm's pool and every ``php-cli`` run are the site user (:data:`SITE_USER`, created when missing),
not www-data: like a SpinupWP site, it cannot delete nginx's cache files and purges through the daemon.
WordPress is installed and changed through its own API (``wp_install``, ``wp_insert_post``,
``wp_update_post``, ...) from ``php-cli``. nginx caches with ``fastcgi_hide_header X-Cache-Tags;``.
"""

from __future__ import annotations

import base64
import glob
import http.client
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import mariadb
from harness.daemon import TOP, free_port
from harness.nginx import CONFIG, NGINX, ZONE, Site, Stack

HOST = "wp.example"
SITE_USER = "cachesvc-site"
WORDPRESS = Path("/usr/share/wordpress")
PLUGIN = TOP / "contrib" / "wordpress" / "cachesvc-tags.php"
PHP = shutil.which("php") or "/usr/bin/php"
TAGS_YAML = "tags:\n  enabled: true\n"
ERRORS = re.compile(r"PHP (Warning|Notice|Deprecated|Fatal error|Parse error)|cachesvc-tags\.php")

SERVER = """
    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        root {site};
        location / {{
            fastcgi_pass 127.0.0.1:{php};
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {site}/index.php;
            fastcgi_param SCRIPT_NAME /index.php;
            fastcgi_cache {name};
            fastcgi_cache_valid 200 60m;
            fastcgi_hide_header X-Cache-Tags;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
"""

FPM = """
[global]
pid = {base}/php-fpm.pid
error_log = {base}/php-fpm.log
daemonize = no
[site]
{user}listen = 127.0.0.1:{port}
pm = static
pm.max_children = 4
catch_workers_output = yes
php_admin_flag[display_errors] = off
php_admin_flag[log_errors] = on
php_admin_value[error_log] = {errors}
"""

# Constants from the environment first (php-cli runs only: php-fpm clears its workers' environment),
# then the site's defaults.
WP_CONFIG = """<?php
$constants = json_decode( (string) getenv( 'CACHESVC_TEST_CONSTANTS' ), true );
foreach ( ( is_array( $constants ) ? $constants : array() ) + json_decode( <<<'JSON'
{defaults}
JSON
, true ) as $name => $value ) {{
	defined( $name ) || define( $name, $value );
}}
unset( $constants, $name, $value );
$table_prefix = 'wp_';
require_once ABSPATH . 'wp-settings.php';
"""

FRONT = """<?php
define( 'WP_USE_THEMES', true );
require __DIR__ . '/wp-config.php';
wp();
require ABSPATH . WPINC . '/template-loader.php';
"""

BOOT = """<?php
$_SERVER += array( 'HTTP_HOST' => '{host}', 'SERVER_NAME' => '{host}', 'SERVER_PORT' => '80', 'REQUEST_URI' => '/',
	'REQUEST_METHOD' => 'GET', 'SERVER_PROTOCOL' => 'HTTP/1.1' );
require __DIR__ . '/wp-config.php';
"""

HARNESS_MU = """<?php
// The test site's own rules: mail goes nowhere, no HTTP request leaves PHP (wp_install tests permalinks).
function wp_mail( $to, $subject, $message, $headers = '', $attachments = array() ) {
	return true;
}
add_filter( 'pre_http_request', function () {
	return new WP_Error( 'http_request_blocked', 'test site: no HTTP requests' );
} );
add_filter( 'cachesvc_page_tags', function ( $tags ) { // tests add tags to every page with this option
	return array_merge( $tags, (array) get_option( 'cachesvc_test_page_tags', array() ) );
} );
"""

THEME_CSS = "/*\nTheme Name: cachesvc test\nDescription: The smallest classic theme for cachesvc's tests.\n*/\n"

THEME = """<?php
// One template: the main loop (title, content, categories), approved comments on single pages, and on
// pages a secondary loop of the latest posts.
?><!doctype html>
<html><head><?php wp_head(); ?></head><body>
<?php while ( have_posts() ) : the_post(); ?>
<article><h2><?php the_title(); ?></h2><?php the_content(); ?><p>in <?php the_category( ', ' ); ?></p>
<?php if ( is_singular() ) : foreach ( get_approved_comments( get_the_ID() ) as $c ) : ?>
<p class="comment"><?php echo esc_html( $c->comment_content ); ?></p>
<?php endforeach; endif; ?></article>
<?php endwhile; ?>
<?php if ( is_page() ) : $latest = new WP_Query( array( 'posts_per_page' => 3, 'ignore_sticky_posts' => true ) ); ?>
<ul class="latest"><?php while ( $latest->have_posts() ) : $latest->the_post(); ?><li><?php the_title(); ?></li>
<?php endwhile; wp_reset_postdata(); ?></ul>
<?php endif; ?>
<?php wp_footer(); ?></body></html>
"""

INSTALL = """
require_once ABSPATH . 'wp-admin/includes/upgrade.php';
wp_install( 'cachesvc test', 'admin', 'admin@wp.example', true, '', 'admin-password' );
switch_theme( 'cachesvc-test' );
$GLOBALS['wp_rewrite']->set_permalink_structure( '/%postname%/' );
$GLOBALS['wp_rewrite']->flush_rules( false );
"""


def php_fpm() -> str | None:
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    return found[-1] if found else None


def missing() -> list[str]:
    """What this stack needs and the machine lacks (names of Debian packages)."""
    php = os.access(PHP, os.X_OK)
    mysqli = php and not subprocess.run([PHP, "-r", "exit(extension_loaded('mysqli') ? 0 : 1);"]).returncode
    nginx = os.access(NGINX, os.X_OK)
    have = {"php-fpm": php_fpm() is not None, "php-cli": php, "php-mysql": mysqli, "nginx-light": nginx,
            "mariadb-server": mariadb.available(), "wordpress": (WORDPRESS / "wp-settings.php").is_file()}
    return [name for name, present in have.items() if not present]


def ensure_packages() -> str | None:
    """Install what is missing as the test command does (scripts/setup.sh), as root or with a sudo that
    asks no password; None when all is there, else why it is not."""
    if not missing():
        return None
    err = "not root, and sudo asks for a password"
    sudo = shutil.which("sudo")
    if os.geteuid() == 0 or (sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0):
        install = ["bash", "-c", "source scripts/setup.sh && ensure_wordpress_packages"]
        err = subprocess.run(install, cwd=TOP, capture_output=True, text=True, timeout=900).stderr.strip()[-500:]
    still = missing()
    return f"Debian packages {', '.join(still)} missing and not installed: {err}" if still else None


def site_user() -> tuple[int, int] | None:
    """(uid, gid) of :data:`SITE_USER`, created when missing; None when we are not root (PHP runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SITE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", SITE_USER],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(SITE_USER)
    return entry.pw_uid, entry.pw_gid


def value(data: Any) -> str:
    """A PHP expression for *data* (JSON-compatible), whatever quotes or dollars it holds."""
    encoded = base64.b64encode(json.dumps(data).encode()).decode()
    return f"json_decode( base64_decode( '{encoded}' ), true )"


def problems(log: str) -> list[str]:
    """The lines of a PHP error log that are PHP's warnings, notices, errors, or name the plugin."""
    return [line for line in log.splitlines() if ERRORS.search(line)]


def stored_tags(path: Path) -> list[str] | None:
    """The ``X-Cache-Tags`` a cache file holds (None: no such header, or no file)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    match = re.search(rb"\r\nX-Cache-Tags: ([^\r\n]*)\r\n", data)
    return match.group(1).decode().split() if match else None


class WordPress(Stack):
    """WordPress at ``http://wp.example`` (see the module's docstring); the daemon, when started with
    :meth:`use_daemon`, purges its zone. *constants* override the site's wp-config defaults."""

    def __init__(self, constants: Mapping[str, Any] | None = None) -> None:
        self.user = site_user()
        self.php_port = free_port()
        self.db: mariadb.MariaDB | None = None
        self.fpm: subprocess.Popen[bytes] | None = None
        super().__init__([Site(HOST)], daemon=False)  # nginx, with the server block of _start_nginx
        self.site = self.base / "site"
        self.errors = self.site / "php-errors.log"
        try:
            self.db = mariadb.MariaDB()
            self.db.create_database("wordpress")
            self._write_site(constants or {}, self.db.host)
            self.php(INSTALL, installing=True)
            self._start_fpm()
        except BaseException:
            self.close()
            raise

    # --- starting ------------------------------------------------------------------------------

    def _start_nginx(self, connections: int) -> None:
        """Stack's nginx, with a server block for WordPress on php-fpm instead of the test origin's."""
        user = "user www-data;" if self.worker else ""
        zones = ZONE.format(root=self.root, host=HOST, name="zone0", size="1m", temp="on")
        servers = SERVER.format(port=self.web_port, host=HOST, php=self.php_port, site=self.base / "site", name="zone0")
        conf = self.base / "nginx.conf"
        conf.write_text(CONFIG.format(user=user, base=self.base, connections=connections, zones=zones, servers=servers))
        self.nginx = subprocess.Popen([NGINX, "-p", str(self.base), "-c", str(conf)], stderr=subprocess.PIPE)
        self._wait_port(self.web_port, self.nginx, "nginx")

    def _wait_port(self, port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise AssertionError(f"{name} exited with {proc.returncode}: {err}") from None
                assert time.monotonic() < deadline, f"{name} did not listen on {port} within {timeout}s"
                time.sleep(0.02)

    def _write_site(self, constants: Mapping[str, Any], db_host: str) -> None:
        content = self.site / "wp-content"
        for directory in (content / "themes" / "cachesvc-test", content / "mu-plugins"):
            directory.mkdir(parents=True, mode=0o755)
        defaults = {
            "DB_NAME": "wordpress", "DB_USER": "root", "DB_PASSWORD": "", "DB_HOST": db_host,
            "DB_CHARSET": "utf8mb4", "DB_COLLATE": "", "ABSPATH": f"{WORDPRESS}/",
            "WP_HOME": f"http://{HOST}", "WP_SITEURL": f"http://{HOST}",
            "WP_CONTENT_DIR": str(content), "WP_CONTENT_URL": f"http://{HOST}/wp-content",
            "WP_DEBUG": True, "WP_DEBUG_DISPLAY": False, "WP_DEBUG_LOG": str(self.errors),
            "DISABLE_WP_CRON": True, "AUTOMATIC_UPDATER_DISABLED": True, "WP_HTTP_BLOCK_EXTERNAL": True,
            "SPINUPWP_CACHE_PATH": str(self.zone(HOST)), "CACHESVC_PORT": self.purge_port, "CACHESVC_TIMEOUT": 5,
            **{f"{k}_{s}": f"cachesvc-test-{k}-{s}" for k in ("AUTH", "SECURE_AUTH", "LOGGED_IN", "NONCE")
               for s in ("KEY", "SALT")},
            **constants,
        }
        files = {
            self.site / "wp-config.php": WP_CONFIG.format(defaults=json.dumps(defaults, indent=1)),
            self.site / "index.php": FRONT,
            self.site / "boot.php": BOOT.format(host=HOST),
            content / "mu-plugins" / "00-harness.php": HARNESS_MU,
            content / "mu-plugins" / "cachesvc-tags.php": PLUGIN.read_text(),
            content / "themes" / "cachesvc-test" / "style.css": THEME_CSS,
            content / "themes" / "cachesvc-test" / "index.php": THEME,
        }
        for path, text in files.items():
            path.write_text(text)
        self.errors.touch()
        (self.base / "opcache").mkdir()
        if self.user:  # the site owns its content and its log, as on a SpinupWP server
            for path in [self.errors, self.base / "opcache", *content.rglob("*"), content]:
                os.chown(path, *self.user)

    def _start_fpm(self) -> None:
        fpm = php_fpm()
        assert fpm, "php-fpm is not installed"
        user = f"user = {SITE_USER}\ngroup = {SITE_USER}\n" if self.user else ""
        conf = self.base / "php-fpm.conf"
        conf.write_text(FPM.format(base=self.base, user=user, port=self.php_port, errors=self.errors))
        self.fpm = subprocess.Popen([fpm, "-F", "-y", str(conf)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self._wait_port(self.php_port, self.fpm, "php-fpm")

    def close(self) -> None:
        try:
            if self.fpm is not None and self.fpm.poll() is None:
                self.fpm.terminate()
                try:
                    self.fpm.wait(10)
                except subprocess.TimeoutExpired:
                    self.fpm.kill()
                    self.fpm.wait(5)
            if self.db is not None:
                self.db.close()
        finally:
            super().close()

    def use_daemon(self, purge_yaml: str = TAGS_YAML) -> Any:
        """The daemon with tag purges on (Stack.use_daemon, another default)."""
        return super().use_daemon(purge_yaml)

    # --- WordPress, through its API --------------------------------------------------------------

    def php(
        self, code: str, constants: Mapping[str, Any] | None = None, installing: bool = False, boot: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run *code* (PHP, without ``<?php``) with php-cli as the site user, WordPress loaded (unless
        *boot* is false); *constants* are defined before wp-config's. Fails on a non-zero exit."""
        head = "<?php\n" + ("define( 'WP_INSTALLING', true );\n" if installing else "")
        head += f"require '{self.site}/boot.php';\n" if boot else ""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CACHESVC_TEST_CONSTANTS": json.dumps(constants or {})}
        # compiled once for all runs (opcache's file cache): 90 ms a run instead of 250
        opcache = ["-d", "opcache.enable_cli=1", "-d", "opcache.file_cache_only=1"]
        opcache += ["-d", f"opcache.file_cache={self.base}/opcache"]
        ids: dict[str, Any] = {"user": self.user[0], "group": self.user[1], "extra_groups": []} if self.user else {}
        done = subprocess.run(
            [PHP, "-d", "display_errors=stderr", "-d", "error_reporting=-1", "-d", "log_errors=0", *opcache],
            input=head + code, capture_output=True, text=True, timeout=60, cwd=self.site, env=env, **ids,
        )
        if done.returncode != 0:
            raise AssertionError(f"php exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done

    def wp(self, body: str, constants: Mapping[str, Any] | None = None) -> Any:
        """The JSON-decoded return value of *body*, the body of a PHP function run in WordPress."""
        code = f"$r = ( function () {{ {body}\n }} )();\necho \"\\n@@result@@\", json_encode( $r );"
        done = self.php(code, constants)
        assert "@@result@@" in done.stdout, f"no result:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return json.loads(done.stdout.split("@@result@@", 1)[1].split("\n", 1)[0])

    def category(self, name: str) -> int:
        return int(self.wp(f"$t = wp_insert_term( {value(name)}, 'category' ); return $t['term_id'];"))

    def post(self, title: str, categories: list[int], status: str = "publish", post_type: str = "post") -> int:
        fields = {"post_title": title, "post_content": f"<p>content of {title}</p>", "post_status": status,
                  "post_category": categories, "post_author": 1, "post_type": post_type}
        return int(self.wp(f"return wp_insert_post( {value(fields)}, true );"))

    def update_post(self, post_id: int, **fields: Any) -> None:
        result = self.wp(f"return wp_update_post( array( 'ID' => {post_id} ) + {value(fields)}, true );")
        assert result == post_id, result

    def trash_post(self, post_id: int) -> None:
        assert self.wp(f"return (bool) wp_trash_post( {post_id} );")

    def comment(self, post_id: int, text: str, approved: bool = False) -> int:
        return int(self.wp(f"return wp_insert_comment( array( 'comment_post_ID' => {post_id}, "
                           f"'comment_content' => {value(text)}, 'comment_approved' => {int(approved)}, "
                           "'comment_author' => 'visitor', 'comment_author_email' => 'visitor@wp.example' ) );"))

    def approve_comment(self, comment_id: int) -> None:
        assert self.wp(f"return wp_set_comment_status( {comment_id}, 'approve' );") is True

    def path(self, what: str) -> str:
        """The path of a URL WordPress computes: ``path("get_permalink( 12 )")``."""
        return str(self.wp(f"return wp_parse_url( {what}, PHP_URL_PATH ) ?: '/';"))

    def php_errors(self) -> str:
        """PHP's error log (php-fpm's workers and WP_DEBUG_LOG of every run)."""
        return self.errors.read_text(errors="replace")

    # --- through nginx ---------------------------------------------------------------------------

    def fetch(self, path: str) -> tuple[int, dict[str, str], str]:
        """One GET as a visitor sees it: status, headers (lower-case names), body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": HOST})
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            conn.close()

    def tags_of(self, path: str) -> list[str] | None:
        """The tags nginx stored for *path*."""
        return stored_tags(self.file(HOST, path))

