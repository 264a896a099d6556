<?php
/**
 * Plugin Name: cachesvc tags
 * Description: Labels front-end pages with the posts, terms and authors they show (X-Cache-Tags) and purges
 *              exactly those pages from the nginx cache through the cachesvc daemon, by tag.
 * Version:     1.0
 * License:     MIT
 *
 * A must-use plugin: copy this file into wp-content/mu-plugins/. It needs a cachesvc daemon with
 * `purge.tags: {enabled: true}` and nginx's `fastcgi_hide_header X-Cache-Tags;` (see cachesvc's README).
 *
 * 1. Every front-end page (HTML and feeds) is sent with an X-Cache-Tags header naming what it shows:
 *      post-<id>       each post rendered, by the main query and by secondary loops (loop_start, the_post)
 *      term-<id>       the term of a term archive, and every term of a rendered post
 *      author-<id>     the author of an author archive
 *      home            the front page and the posts page (and the main feed)
 *      archive-<type>  a post type archive; date archives are archive-post
 *    nginx hides the header from visitors and keeps it in the cache file, where cachesvc reads it. A page
 *    whose tags do not fit in CACHESVC_TAGS_MAX_BYTES, or whose output was flushed before it was complete
 *    (its tags are then unknown), is sent with `X-Accel-Expires: 0` instead: nginx does not cache it.
 *
 * 2. When a post of a public post type (not attachments) is published, updated, unpublished, trashed or
 *    deleted, or one of its comments is approved or leaves the approved state, the post's tags are purged:
 *      [soft:]tag:<cache path> post-<id>,term-<id>,...,author-<id>,home,archive-<type>
 *    Terms are the post's terms before and after the change, with their ancestors. Every change of one
 *    request goes in one line at the end of the request (split only past 4,000 bytes), sent as the
 *    SpinupWP plugin sends its paths: one connection per line, one line, one read of up to 512 bytes,
 *    success only if the reply starts with `Purge: Success`. A daemon that is down or answers
 *    `Purge: Error` is reported through the cachesvc_tags_purged action; it never raises a PHP warning.
 *
 * 3. With the SpinupWP plugin, its whole-site purge on post changes is turned off for the post types
 *    handled here (its filter spinupwp_post_types_excluded_from_purge); the rest of that plugin (URL
 *    purges on comments, theme switches, the admin bar, spinupwp_purge_site()) is left as it is.
 *
 * Constants (wp-config.php), all optional:
 *   CACHESVC_CACHE_PATH      the zone to purge in, e.g. /cache/example.com (default: SPINUPWP_CACHE_PATH,
 *                            the constant or the environment variable); with neither, the plugin does nothing
 *   CACHESVC_HOST            the daemon's address (default 127.0.0.1), or unix:///path/to/socket
 *   CACHESVC_PORT            the daemon's port (default 7836)
 *   CACHESVC_TIMEOUT         seconds to connect and to wait for the reply (default 5)
 *   CACHESVC_SOFT_PURGE      true: purge softly (soft:tag:...; entries are marked expired, served STALE)
 *   CACHESVC_TAGS_HEADER     the response header's name (default X-Cache-Tags)
 *   CACHESVC_TAGS_MAX_BYTES  the longest header value sent (default 3000; nginx's fastcgi_buffer_size
 *                            must hold every response header)
 *
 * Hooks: filter cachesvc_page_tags (string[] $tags): the tags of the page being sent;
 *        filter cachesvc_post_tags (string[] $tags, WP_Post $post): the tags purged for a post;
 *        action cachesvc_tags_purged (string $line, bool $success): after each purge line.
 * A tag is printable ASCII without spaces or commas; other tags are dropped.
 */

if ( ! defined( 'ABSPATH' ) ) {
	exit;
}

final class Cachesvc_Tags {

	/** Longest purge line sent, below the daemon's 4,096-byte default limit. */
	const MAX_LINE = 4000;

	/** @var array<string, true> tags of the page being rendered */
	private static $page = array();

	/** @var array<string, true> tags to purge at the end of the request */
	private static $purge = array();

	/** @var bool whether this request renders a front-end page */
	private static $rendering = false;

	/** @var bool whether the page's headers were decided */
	private static $sent = false;

	public static function init() {
		if ( '' === self::cache_path() ) {
			return;
		}
		add_action( 'template_redirect', array( __CLASS__, 'start_page' ), PHP_INT_MAX );
		add_action( 'loop_start', array( __CLASS__, 'loop_start' ) );
		add_action( 'the_post', array( __CLASS__, 'rendered' ) );
		add_action( 'pre_post_update', array( __CLASS__, 'before_update' ) );
		add_action( 'transition_post_status', array( __CLASS__, 'transition' ), 10, 3 );
		add_action( 'before_delete_post', array( __CLASS__, 'before_delete' ) );
		add_action( 'comment_post', array( __CLASS__, 'new_comment' ), 10, 2 );
		add_action( 'edit_comment', array( __CLASS__, 'edited_comment' ) );
		add_action( 'transition_comment_status', array( __CLASS__, 'comment_status' ), 10, 3 );
		add_action( 'shutdown', array( __CLASS__, 'send_purges' ), 0 );
		add_filter( 'spinupwp_post_types_excluded_from_purge', array( __CLASS__, 'spinupwp_excluded' ) );
	}

	/** The zone purged in: CACHESVC_CACHE_PATH, else SpinupWP's; '' when none (or one with spaces) is set. */
	public static function cache_path() {
		if ( defined( 'CACHESVC_CACHE_PATH' ) ) {
			$path = CACHESVC_CACHE_PATH;
		} elseif ( defined( 'SPINUPWP_CACHE_PATH' ) ) {
			$path = SPINUPWP_CACHE_PATH;
		} else {
			$path = getenv( 'SPINUPWP_CACHE_PATH' );
		}
		$path = rtrim( (string) $path, '/' );
		return preg_match( '/\s/', $path ) ? '' : $path;
	}

	// --- the page's tags -------------------------------------------------------------------------

	/** template_redirect, after redirects: what the main query is; buffer the page to send its tags. */
	public static function start_page() {
		$tags = array();
		if ( is_front_page() || is_home() ) {
			$tags[] = 'home';
		}
		if ( is_feed() && ! is_archive() && ! is_singular() && ! is_search() ) {
			$tags[] = 'home';
		}
		if ( is_singular() ) {
			$tags[] = 'post-' . get_queried_object_id();
		}
		if ( is_category() || is_tag() || is_tax() ) {
			$tags[] = 'term-' . get_queried_object_id();
		}
		if ( is_author() ) {
			$tags[] = 'author-' . get_queried_object_id();
		}
		if ( is_post_type_archive() ) {
			foreach ( (array) get_query_var( 'post_type' ) as $type ) {
				$tags[] = 'archive-' . $type;
			}
		}
		if ( is_date() ) {
			$tags[] = 'archive-post';
		}
		self::add( self::$page, $tags );
		self::$rendering = true;
		ob_start( array( __CLASS__, 'output' ) );
	}

	/** loop_start: every post the loop is about to show (main query or secondary). */
	public static function loop_start( $query ) {
		if ( self::$rendering && $query instanceof WP_Query ) {
			foreach ( $query->posts as $post ) {
				self::rendered( $post );
			}
		}
	}

	/** the_post (and loop_start): a post shown on the page, with its terms. */
	public static function rendered( $post ) {
		$post = get_post( $post );
		if ( self::$rendering && $post ) {
			self::add( self::$page, self::post_and_terms( $post, false ) );
		}
	}

	/** The output buffer's handler: the headers go with the first output that leaves PHP. */
	public static function output( $buffer, $phase ) {
		if ( self::$sent || ! ( $phase & ( PHP_OUTPUT_HANDLER_FLUSH | PHP_OUTPUT_HANDLER_FINAL ) ) ) {
			return $buffer;
		}
		self::$sent = true;
		$tags  = self::clean( apply_filters( 'cachesvc_page_tags', array_keys( self::$page ) ) );
		$value = implode( ' ', $tags );
		$limit = defined( 'CACHESVC_TAGS_MAX_BYTES' ) ? (int) CACHESVC_TAGS_MAX_BYTES : 3000;
		if ( headers_sent() || ! $tags ) {
			return $buffer;
		}
		if ( ! ( $phase & PHP_OUTPUT_HANDLER_FINAL ) || strlen( $value ) > $limit ) {
			header( 'X-Accel-Expires: 0' ); // the tags are incomplete: better not cached than never purged
		} else {
			header( ( defined( 'CACHESVC_TAGS_HEADER' ) ? CACHESVC_TAGS_HEADER : 'X-Cache-Tags' ) . ': ' . $value );
		}
		return $buffer;
	}

	// --- purging -----------------------------------------------------------------------------------

	/** pre_post_update: the post as it is before the change (its old terms and author go too). */
	public static function before_update( $post_id ) {
		self::queue( get_post( $post_id ) );
	}

	/** transition_post_status: published, updated, unpublished or trashed. */
	public static function transition( $new_status, $old_status, $post ) {
		if ( 'publish' === $new_status || 'publish' === $old_status ) {
			self::queue( $post, true );
		}
	}

	/** before_delete_post: a published post deleted outright (a trashed one was purged when trashed). */
	public static function before_delete( $post_id ) {
		self::queue( get_post( $post_id ) );
	}

	/** comment_post: a new comment, approved at once. */
	public static function new_comment( $comment_id, $approved ) {
		if ( 1 === $approved || '1' === $approved ) {
			self::queue_comment( $comment_id );
		}
	}

	/** edit_comment: an approved comment's text changed. */
	public static function edited_comment( $comment_id ) {
		$comment = get_comment( $comment_id );
		if ( $comment && '1' === (string) $comment->comment_approved ) {
			self::queue_comment( $comment );
		}
	}

	/** transition_comment_status: approved, or unapproved, spammed, trashed or deleted after approval. */
	public static function comment_status( $new_status, $old_status, $comment ) {
		if ( 'approved' === $new_status || 'approved' === $old_status ) {
			self::queue_comment( $comment );
		}
	}

	/** shutdown: this request's purges, one line per MAX_LINE bytes, one connection each. */
	public static function send_purges() {
		if ( ! self::$purge ) {
			return;
		}
		$soft   = defined( 'CACHESVC_SOFT_PURGE' ) && CACHESVC_SOFT_PURGE;
		$prefix = ( $soft ? 'soft:' : '' ) . 'tag:' . self::cache_path() . ' ';
		$lines  = array();
		$line   = '';
		foreach ( array_keys( self::$purge ) as $tag ) {
			if ( '' !== $line && strlen( $prefix . $line . ',' . $tag ) > self::MAX_LINE ) {
				$lines[] = $prefix . $line;
				$line    = '';
			}
			$line = '' === $line ? $tag : $line . ',' . $tag;
		}
		$lines[]     = $prefix . $line;
		self::$purge = array();
		foreach ( $lines as $line ) {
			do_action( 'cachesvc_tags_purged', $line, self::send( $line ) );
		}
	}

	/** One line to the daemon, as the SpinupWP plugin does: connect, write, one read, close. */
	public static function send( $line ) {
		$host    = defined( 'CACHESVC_HOST' ) ? (string) CACHESVC_HOST : '127.0.0.1';
		$port    = defined( 'CACHESVC_PORT' ) ? (int) CACHESVC_PORT : 7836;
		$timeout = defined( 'CACHESVC_TIMEOUT' ) ? (float) CACHESVC_TIMEOUT : 5.0;
		$address = 0 === strpos( $host, 'unix://' ) ? $host : 'tcp://' . $host . ':' . $port;
		$socket  = @stream_socket_client( $address, $errno, $errstr, $timeout );
		if ( ! $socket ) {
			return false;
		}
		stream_set_timeout( $socket, (int) $timeout, (int) ( fmod( $timeout, 1.0 ) * 1000000 ) );
		$reply = false;
		if ( @fwrite( $socket, $line . "\n" ) === strlen( $line ) + 1 ) {
			$reply = @fread( $socket, 512 );
		}
		fclose( $socket );
		return is_string( $reply ) && 1 === preg_match( '/^Purge:\sSuccess/', $reply );
	}

	/** The SpinupWP plugin's filter: no whole-site purge for the post types purged by tag here. */
	public static function spinupwp_excluded( $types ) {
		foreach ( get_post_types() as $type ) {
			if ( self::handles( $type ) ) {
				$types[] = $type;
			}
		}
		return array_values( array_unique( (array) $types ) );
	}

	// --- helpers -----------------------------------------------------------------------------------

	/** Public post types with pages of their own, attachments aside (the SpinupWP plugin skips them too). */
	private static function handles( $type ) {
		$object = get_post_type_object( $type );
		return $object && 'attachment' !== $type && is_post_type_viewable( $object );
	}

	/** A published post of a handled type: its tags to purge at the end of the request. */
	private static function queue( $post, $any_status = false ) {
		if ( ! $post instanceof WP_Post || ! self::handles( $post->post_type ) ) {
			return;
		}
		if ( ! $any_status && 'publish' !== $post->post_status ) {
			return;
		}
		$tags   = self::post_and_terms( $post, true );
		$tags[] = 'author-' . (int) $post->post_author;
		$tags[] = 'home';
		$tags[] = 'archive-' . $post->post_type;
		self::add( self::$purge, self::clean( apply_filters( 'cachesvc_post_tags', $tags, $post ) ) );
	}

	private static function queue_comment( $comment ) {
		$comment = get_comment( $comment );
		if ( $comment ) {
			self::queue( get_post( $comment->comment_post_ID ) );
		}
	}

	/** post-<id> and term-<id> of each of its terms (with their ancestors, for purges). */
	private static function post_and_terms( WP_Post $post, $ancestors ) {
		$tags = array( 'post-' . $post->ID );
		foreach ( get_object_taxonomies( $post->post_type ) as $taxonomy ) {
			$terms = get_the_terms( $post, $taxonomy );
			foreach ( is_array( $terms ) ? $terms : array() as $term ) {
				$tags[] = 'term-' . $term->term_id;
				foreach ( $ancestors ? get_ancestors( $term->term_id, $taxonomy, 'taxonomy' ) : array() as $parent ) {
					$tags[] = 'term-' . $parent;
				}
			}
		}
		return $tags;
	}

	/** @param array<string, true> $set */
	private static function add( array &$set, array $tags ) {
		foreach ( $tags as $tag ) {
			$set[ (string) $tag ] = true;
		}
	}

	/** Tags as the wire and the header can carry them (printable ASCII, no space or comma), each once. */
	private static function clean( $tags ) {
		$clean = array();
		foreach ( (array) $tags as $tag ) {
			if ( is_scalar( $tag ) && 1 === preg_match( '/^[\x21-\x2b\x2d-\x7e]+$/', (string) $tag ) ) {
				$clean[ (string) $tag ] = true;
			}
		}
		return array_keys( $clean );
	}
}

Cachesvc_Tags::init();
