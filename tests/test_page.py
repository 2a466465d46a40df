"""The shopper's page, driven in headless Chromium against the real app.

Each test starts from an empty database; the app runs in waitress on a free
port (conftest's live_server). Sales open a few seconds in the future at most,
so the module takes well under a minute.

Set SCREENSHOTS=docs to also save the page in each state as docs/page-*.png.
"""

import os
import re
import threading
import time
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from pathlib import Path

import jwt
import pytest

from conftest import TEST_SECRET
from conftest import call
from conftest import wait_for
from resources import hashing
from resources import sales

try:
    from playwright.sync_api import expect
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
]
PASSWORD = 'correct horse battery'
SCREENSHOTS = os.environ.get('SCREENSHOTS')


# --- the app and its users ------------------------------------------------------
# The app (live_server), the emptied database (db), make_sale and call (one
# API request) come from conftest.py.


def register(server, email=None):
    """A user registered through the API, so the page can log in with PASSWORD:
    (email, token)."""
    email = email or f'shopper-{uuid.uuid4().hex[:8]}@example.com'
    status, _, body = call(server, 'POST', '/api/auth/register', {'email': email, 'password': PASSWORD})
    assert status == 201, body
    return email, body['token']


def buy(server, sale_id, token):
    status, _, body = call(server, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token)
    assert status == 201, body


@pytest.fixture
def admin_email(live_server, db):
    email, _ = register(live_server, 'admin@example.com')
    db.execute('UPDATE users SET is_admin = true WHERE email = %s', (email,))
    return email


# --- the browser ---------------------------------------------------------------


@pytest.fixture(scope='module')
def browser():
    missing = None
    if sync_playwright is None:
        missing = 'the playwright module is not installed (pip install playwright)'
    elif not os.path.exists(CHROMIUM):
        missing = f'{CHROMIUM} is missing (apt-get install chromium)'
    if missing:
        if os.environ.get('CI'):
            pytest.fail(f'page tests cannot run in CI: {missing}')
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, live_server):
    """open_page(**context_options) -> a new page in its own browser context
    (its own localStorage), at the shop's front page. The test fails if the
    page throws or the browser blocks anything under the page's CSP."""
    contexts = []
    problems = []

    def open_(**options):
        options.setdefault('viewport', {'width': 1000, 'height': 800})
        context = browser.new_context(base_url=live_server, **options)
        context.set_default_timeout(5000)
        contexts.append(context)
        page = context.new_page()
        page.on('pageerror', lambda error: problems.append(f'uncaught: {error}'))
        page.on('console', lambda message: problems.append(message.text)
                if 'Content Security Policy' in message.text else None)
        page.goto('/')
        return page

    yield open_
    for context in contexts:
        context.close()
    assert problems == []


@pytest.fixture
def shopper_page(open_page, live_server):
    """shopper_page() -> the front page, logged in as a shopper registered just now."""

    def open_():
        email, _ = register(live_server)
        page = open_page()
        log_in(page, email)
        return page

    return open_


def log_in(page, email):
    page.locator('#login-email').fill(email)
    page.locator('#login-password').fill(PASSWORD)
    page.locator('#login-submit').click()
    expect(page.get_by_test_id('account-email')).to_have_text(email)


def snap(page, name, full_page=False):
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=f'{SCREENSHOTS}/page-{name}.png', full_page=full_page)


def order_id_in_db(db, email):
    row = db.execute(
        'SELECT orders.id FROM orders JOIN users ON users.id = orders.user_id WHERE users.email = %s',
        (email,),
    ).fetchone()
    return str(row['id']) if row else None


# --- the tests -----------------------------------------------------------------


def test_shopper_registers_waits_for_the_countdown_and_buys_one(open_page, make_sale, db):
    sale_id = make_sale(stock=5, starts_in=3, name='Limited sneakers')
    page = open_page()
    # The browser's clock is two hours fast: the page must count down by the
    # server's clock, or it would show this sale as ended.
    page.clock.set_system_time(datetime.now(timezone.utc) + timedelta(hours=2))
    page.reload()

    page.get_by_test_id('show-register').click()
    page.locator('#register-email').fill('ann@example.com')
    page.locator('#register-password').fill(PASSWORD)
    page.get_by_test_id('register-submit').click()
    expect(page.get_by_test_id('account-email')).to_have_text('ann@example.com')
    expect(page.get_by_test_id('auth')).to_be_hidden()

    expect(page.get_by_test_id('sale-name')).to_have_text('Limited sneakers')
    expect(page.get_by_test_id('sale-status')).to_have_text('Upcoming')
    expect(page.get_by_test_id('countdown-label')).to_have_text('Starts in')
    expect(page.get_by_test_id('countdown')).to_have_text(re.compile(r'^00:00:0[1-3]$'))
    expect(page.get_by_test_id('stock-remaining')).to_have_text('5')
    expect(page.get_by_test_id('buy')).to_be_disabled()
    snap(page, 'upcoming')

    expect(page.get_by_test_id('buy')).to_be_enabled(timeout=6000)
    expect(page.get_by_test_id('sale-status')).to_have_text('Live now')
    expect(page.get_by_test_id('countdown-label')).to_have_text('Ends in')
    expect(page.get_by_test_id('countdown')).to_have_text(re.compile(r'^00:59:5\d$'))
    snap(page, 'active')

    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('order')).to_be_visible()
    expect(page.get_by_test_id('order')).to_contain_text('You got one!')
    order_id = order_id_in_db(db, 'ann@example.com')
    assert order_id is not None
    expect(page.get_by_test_id('order-id')).to_have_text(order_id)
    expect(page.get_by_test_id('stock-remaining')).to_have_text('4')
    expect(page.get_by_test_id('buy')).to_be_disabled()
    expect(page.get_by_test_id('buy')).to_have_text('Bought')
    snap(page, 'bought')

    # Still logged in after a reload, and the order is looked up again.
    page.reload()
    expect(page.get_by_test_id('account-email')).to_have_text('ann@example.com')
    expect(page.get_by_test_id('order-id')).to_have_text(order_id)
    expect(page.get_by_test_id('buy')).to_be_disabled()
    row = db.execute('SELECT remaining_stock FROM flash_sales WHERE id = %s', (sale_id,)).fetchone()
    assert row['remaining_stock'] == 4


def test_another_shopper_sees_the_stock_go_down_without_reloading(open_page, make_sale, live_server):
    make_sale(stock=3)
    buyer_email, _ = register(live_server)
    watcher = open_page()
    watcher.evaluate('window.sameDocument = true')
    expect(watcher.get_by_test_id('stock-remaining')).to_have_text('3')

    buyer = open_page()
    log_in(buyer, buyer_email)
    buyer.get_by_test_id('buy').click()
    expect(buyer.get_by_test_id('order')).to_be_visible()

    expect(watcher.get_by_test_id('stock-remaining')).to_have_text('2', timeout=4000)
    assert watcher.evaluate('window.sameDocument') is True


def test_polls_send_the_last_etag_and_a_304_keeps_what_the_page_shows(open_page, make_sale, live_server):
    sale_id = make_sale(stock=3)
    polls = []  # (If-None-Match sent, status, ETag received)
    page = open_page()
    page.goto('about:blank')  # watch from the page's very first poll
    page.on('response', lambda response: polls.append((
        response.request.headers.get('if-none-match'), response.status, response.headers.get('etag'),
    )) if response.url.endswith('/current') else None)
    # Watched until the state under test: a poll answered 304 (at least the
    # second, since the first has no ETag to send).
    with page.expect_response(lambda r: r.url.endswith('/current') and r.status == 304, timeout=15_000):
        page.goto('/')
        expect(page.get_by_test_id('stock-remaining')).to_have_text('3')

    assert len(polls) >= 2
    assert {status for _, status, _ in polls} <= {200, 304}
    assert 304 in {status for _, status, _ in polls}
    last_etag = None
    for sent, status, received in polls:
        assert sent == last_etag
        if status == 200:
            last_etag = received
    expect(page.get_by_test_id('stock-remaining')).to_have_text('3')

    buy(live_server, sale_id, register(live_server)[1])
    expect(page.get_by_test_id('stock-remaining')).to_have_text('2')


def test_a_shopper_can_log_in_and_buy_with_the_keyboard_alone(open_page, make_sale, live_server):
    make_sale()
    email, _ = register(live_server)
    page = open_page()
    page.keyboard.press('Tab')  # the buy button is disabled, so the first stop is the login form
    expect(page.locator('#login-email')).to_be_focused()
    page.keyboard.type(email)
    page.keyboard.press('Tab')
    page.keyboard.type(PASSWORD)
    page.keyboard.press('Enter')
    expect(page.get_by_test_id('account-email')).to_have_text(email)

    # The form is gone; the focus moved on to the buy button.
    expect(page.get_by_test_id('buy')).to_be_focused()
    page.keyboard.press('Enter')
    expect(page.get_by_test_id('order')).to_be_visible()


def test_a_sold_out_sale_says_so_and_cannot_be_bought(shopper_page, make_sale, live_server):
    sale_id = make_sale(stock=1)
    buy(live_server, sale_id, register(live_server)[1])

    page = shopper_page()
    expect(page.get_by_test_id('sale-status')).to_have_text('Sold out')
    expect(page.get_by_test_id('stock-remaining')).to_have_text('0')
    expect(page.get_by_test_id('buy')).to_be_disabled()
    expect(page.get_by_test_id('buy')).to_have_text('Sold out')
    expect(page.get_by_test_id('buy-hint')).to_contain_text('Sold out')
    snap(page, 'sold-out')


def set_hidden(page, hidden):
    """Play the browser hiding or showing the tab."""
    page.evaluate('''(hidden) => {
        Object.defineProperty(document, 'hidden', {value: hidden, configurable: true});
        document.dispatchEvent(new Event('visibilitychange'));
    }''', hidden)


def test_a_hidden_tab_stops_polling_and_a_late_click_hears_sold_out(shopper_page, make_sale, live_server):
    sale_id = make_sale(stock=1)
    page = shopper_page()
    expect(page.get_by_test_id('buy')).to_be_enabled()

    polls, in_flight = [], set()

    def sent(request):
        if request.url.endswith('/current'):
            polls.append(request.url)
            in_flight.add(request)

    page.on('request', sent)
    page.on('requestfinished', lambda request: in_flight.discard(request))
    page.on('requestfailed', lambda request: in_flight.discard(request))
    set_hidden(page, True)
    # A poll already on its way may finish (and, the tab hidden, schedules no other).
    deadline = time.monotonic() + 10
    while in_flight:
        assert time.monotonic() < deadline, 'a poll sent before the tab was hidden never finished'
        page.wait_for_timeout(20)
    polls.clear()

    # Someone else takes the last item while this tab is not looking. An
    # absence can only be shown over time: longer than a poll interval.
    buy(live_server, sale_id, register(live_server)[1])
    page.wait_for_timeout(2000)
    assert polls == [], f'a hidden tab polled: {polls}'

    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('buy-message')).to_have_text('Sorry, this sale is sold out.')
    expect(page.get_by_test_id('stock-remaining')).to_have_text('0')
    expect(page.get_by_test_id('buy')).to_be_disabled()

    # Shown again, it polls (a hidden tab left no timer: only the
    # visibilitychange handler can start polling again).
    with page.expect_request(lambda request: request.url.endswith('/current'), timeout=10_000):
        set_hidden(page, False)


def test_an_ended_sale_cannot_be_bought(shopper_page, make_sale):
    make_sale(starts_in=-120, ends_in=-60)
    page = shopper_page()
    expect(page.get_by_test_id('sale-status')).to_have_text('Ended')
    expect(page.get_by_test_id('countdown-label')).to_have_text('This sale has ended.')
    expect(page.get_by_test_id('buy')).to_be_disabled()
    expect(page.get_by_test_id('buy')).to_have_text('Sale ended')


def test_a_busy_server_says_when_to_try_again(shopper_page, make_sale, db):
    sale_id = make_sale()
    page = shopper_page()
    expect(page.get_by_test_id('buy')).to_be_enabled()

    purchases = []
    page.on('response', lambda r: purchases.append(r.status) if r.url.endswith('/purchase') else None)
    # Hold the sale row: the purchase waits out the server's lock_timeout and
    # the API answers 503 overloaded with Retry-After. The page says so and
    # tries again by itself, as often as it takes.
    with db.transaction():
        db.execute('SELECT id FROM flash_sales WHERE id = %s FOR UPDATE', (sale_id,))
        page.get_by_test_id('buy').click()
        expect(page.get_by_test_id('buy-message')).to_have_text(
            re.compile(r'^Busy, trying again in \d+ s…$'), timeout=8000)
        expect(page.get_by_test_id('buy-hint')).to_have_text(re.compile(r'^Busy, trying again in \d+ s…$'))
        assert purchases and set(purchases) == {503}

    # No second click: the retry after the lock went is the one that buys.
    expect(page.get_by_test_id('order')).to_be_visible(timeout=15000)
    expect(page.get_by_test_id('buy-message')).to_have_text('')
    assert purchases[-1] == 201 and purchases.count(201) == 1
    assert db.execute('SELECT count(*) AS n FROM orders').fetchone()['n'] == 1


@pytest.fixture
def tiny_queue_server(make_app, serve_in_thread):
    """The app with room for one login at a time in its hashing queue, in the
    real server: (base URL, the queue)."""
    queue = hashing.HashQueue(processes=1, capacity=1, max_wait=30, niceness=0)
    yield serve_in_thread(make_app(queue=queue, hash_queue=1)), queue
    queue.close()


def test_a_login_answered_busy_is_retried_by_the_page_until_it_succeeds(browser, tiny_queue_server, db):
    """A real 503: the queue's one place is taken by a slow login (a stored
    hash of cost 15, seconds of bcrypt), so the page's login is refused with
    Retry-After. The page says so, waits, tries again, and logs in."""
    base, queue = tiny_queue_server
    email, _ = register(base)
    db.execute("INSERT INTO users (email, password_hash) VALUES ('slow@example.com', %s)",
               (hashing.hash_password(b'slow password', 15),))
    slow = threading.Thread(target=call, args=(base, 'POST', '/api/auth/login',
                                               {'email': 'slow@example.com', 'password': 'slow password'}))
    context = browser.new_context(base_url=base)
    context.set_default_timeout(5000)
    try:
        page = context.new_page()
        logins = []
        page.on('response', lambda r: logins.append(r.status) if r.url.endswith('/api/auth/login') else None)
        page.goto('/')
        page.locator('#login-email').fill(email)
        page.locator('#login-password').fill(PASSWORD)
        slow.start()
        wait_for(lambda: queue.in_flight == 1, timeout=30, message='the slow login to take the one place')
        page.locator('#login-submit').click()
        expect(page.get_by_test_id('auth-message')).to_have_text(re.compile(r'^Busy, trying again in \d+ s…$'))
        expect(page.get_by_test_id('account-email')).to_have_text(email, timeout=60000)
        assert logins[0] == 503 and logins[-1] == 200 and set(logins) == {503, 200}
    finally:
        slow.join(timeout=120)
        context.close()


def test_an_open_page_renews_its_token_in_the_background(open_page, make_sale, live_server, db):
    """A token past half its life (logged in long before the sale) is swapped
    for a fresh one without the password, and the shopper stays logged in."""
    make_sale()
    email, token = register(live_server)
    user_id = jwt.decode(token, TEST_SECRET, algorithms=['HS256'])['sub']
    now = int(time.time())
    old = jwt.encode({'sub': user_id, 'gen': 0, 'iat': now - 3000, 'exp': now + 600}, TEST_SECRET, algorithm='HS256')
    page = open_page()
    refreshes = []
    page.on('response', lambda r: refreshes.append(r.status) if r.url.endswith('/api/auth/refresh') else None)
    page.evaluate('token => localStorage.setItem("flashsale.token", token)', old)
    page.reload()
    expect(page.get_by_test_id('account-email')).to_have_text(email)
    page.wait_for_function('old => localStorage.getItem("flashsale.token") !== old', arg=old)
    renewed = page.evaluate('localStorage.getItem("flashsale.token")')
    claims = jwt.decode(renewed, TEST_SECRET, algorithms=['HS256'])
    assert claims['sub'] == user_id and claims['exp'] >= now + 3600
    assert refreshes == [200]
    expect(page.get_by_test_id('buy')).to_be_enabled()


def test_a_revoked_session_sends_the_open_page_back_to_the_login_form(open_page, make_sale, live_server, db):
    make_sale()
    email, _ = register(live_server)
    page = open_page()
    # The page's own look for an order after the login has its answer first:
    # revoked while it was in flight, that look would end the session, not
    # the purchase this test is about.
    with page.expect_response(lambda r: '/api/me/orders/' in r.url):
        log_in(page, email)
    expect(page.get_by_test_id('buy')).to_be_enabled()
    db.execute('UPDATE users SET token_generation = token_generation + 1 WHERE email = %s', (email,))
    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('auth-message')).to_have_text('Your session expired, please log in again.')
    expect(page.get_by_test_id('login-form')).to_be_visible()
    assert db.execute('SELECT count(*) AS n FROM orders').fetchone()['n'] == 0


def test_shoppers_do_not_see_the_admin_panel_and_the_api_refuses_them(shopper_page, make_sale, live_server):
    make_sale(starts_in=60)
    page = shopper_page()
    expect(page.get_by_test_id('sale-status')).to_have_text('Upcoming')
    expect(page.get_by_test_id('admin')).to_be_hidden()

    token = page.evaluate("localStorage.getItem('flashsale.token')")
    now = datetime.now(timezone.utc)
    status, _, body = call(live_server, 'POST', '/api/flash-sales', {
        'startDate': now.isoformat(), 'endDate': (now + timedelta(hours=1)).isoformat(), 'totalStock': 1,
    }, token=token)
    assert (status, body['code']) == (403, 'forbidden')


def test_an_admin_creates_a_sale_from_the_page_in_local_time(open_page, admin_email, live_server):
    # In Kolkata (UTC+05:30), 09:30 local is 04:00 UTC.
    page = open_page(timezone_id='Asia/Kolkata')
    expect(page.get_by_test_id('no-sale')).to_be_visible()
    expect(page.get_by_test_id('no-sale')).to_contain_text('No sale scheduled')
    log_in(page, admin_email)
    expect(page.get_by_test_id('admin')).to_be_visible()

    page.get_by_label('Name', exact=True).fill('Winter boots')
    page.get_by_label('Starts (your local time)').fill('2030-01-02T09:30:00')
    page.get_by_label('Ends (your local time)').fill('2030-01-02T11:00:00')
    page.get_by_label('Stock', exact=True).fill('7')
    page.get_by_test_id('create-submit').click()

    expect(page.get_by_test_id('create-message')).to_have_text('Created “Winter boots”.')
    row = page.get_by_test_id('sale-row')
    expect(row).to_have_count(1)
    expect(row.get_by_test_id('sale-row-name')).to_have_text('Winter boots')
    expect(row.get_by_test_id('sale-row-status')).to_have_text('Upcoming')
    expect(row.get_by_test_id('sale-row-sold')).to_have_text('0 / 7')
    # The new sale is the current one now, and the shopper's card shows it.
    expect(page.get_by_test_id('sale-name')).to_have_text('Winter boots')
    snap(page, 'admin', full_page=True)

    status, _, body = call(live_server, 'GET', '/api/flash-sales')
    assert status == 200
    [sale] = body['flashSales']
    assert datetime.fromisoformat(sale['startDate']) == datetime(2030, 1, 2, 4, 0, tzinfo=timezone.utc)
    assert datetime.fromisoformat(sale['endDate']) == datetime(2030, 1, 2, 5, 30, tzinfo=timezone.utc)
    assert (sale['name'], sale['totalStock'], sale['remainingStock']) == ('Winter boots', 7, 7)


def test_the_admin_table_counts_items_sold(open_page, admin_email, make_sale, live_server):
    sale_id = make_sale(stock=4)
    for _ in range(2):
        buy(live_server, sale_id, register(live_server)[1])
    page = open_page()
    log_in(page, admin_email)
    expect(page.get_by_test_id('sale-row-sold')).to_have_text('2 / 4')
    # Someone else buys: the open table follows, with no Refresh click.
    buy(live_server, sale_id, register(live_server)[1])
    expect(page.get_by_test_id('sale-row-sold')).to_have_text('3 / 4')
    # And the admin's own purchase shows at once.
    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('order')).to_be_visible()
    expect(page.get_by_test_id('sale-row-sold')).to_have_text('4 / 4')


def test_form_errors_are_shown_in_words_next_to_the_field(open_page, live_server):
    taken, _ = register(live_server)
    page = open_page()

    page.locator('#login-email').fill(taken)
    page.locator('#login-password').fill('not the password')
    page.get_by_test_id('login-submit').click()
    expect(page.get_by_test_id('auth-message')).to_have_text("That email and password don't match. Please try again.")

    page.get_by_test_id('show-register').click()
    page.get_by_test_id('register-submit').click()
    expect(page.get_by_test_id('register-email-error')).to_have_text('Enter your email address.')
    expect(page.locator('#register-email')).to_be_focused()

    page.locator('#register-email').fill('not-an-email')
    page.locator('#register-password').fill(PASSWORD)
    page.get_by_test_id('register-submit').click()
    expect(page.get_by_test_id('register-email-error')).to_contain_text('valid email address')
    expect(page.locator('#register-email')).to_have_attribute('aria-invalid', 'true')
    snap(page, 'register-error')

    page.locator('#register-email').fill('new@example.com')
    page.locator('#register-password').fill('short')
    page.get_by_test_id('register-submit').click()
    expect(page.get_by_test_id('register-password-error')).to_have_text('Your password must be 8 to 72 characters long.')
    expect(page.get_by_test_id('register-email-error')).to_be_hidden()

    page.locator('#register-email').fill(taken)
    page.locator('#register-password').fill(PASSWORD)
    page.get_by_test_id('register-submit').click()
    expect(page.get_by_test_id('register-email-error')).to_contain_text('already exists')


def test_an_invalid_session_sends_the_shopper_back_to_the_login_form(shopper_page, make_sale):
    make_sale()
    page = shopper_page()
    expect(page.get_by_test_id('buy')).to_be_enabled()

    page.evaluate("localStorage.setItem('flashsale.token', 'not.a.token')")
    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('auth-message')).to_have_text('Your session expired, please log in again.')
    expect(page.get_by_test_id('login-form')).to_be_visible()
    expect(page.get_by_test_id('account')).to_be_hidden()
    assert page.evaluate("localStorage.getItem('flashsale.token')") is None

    # A bad token found on load is dropped too.
    page.evaluate("localStorage.setItem('flashsale.token', 'not.a.token')")
    page.reload()
    expect(page.get_by_test_id('login-form')).to_be_visible()
    expect(page.get_by_test_id('buy-hint')).to_have_text('Log in or create an account to buy.')
    assert page.evaluate("localStorage.getItem('flashsale.token')") is None


def test_a_network_failure_shows_a_retry_hint(shopper_page, make_sale):
    make_sale()
    page = shopper_page()
    expect(page.get_by_test_id('buy')).to_be_enabled()

    page.context.set_offline(True)
    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('buy-message')).to_have_text(
        "Can't reach the shop. Check your connection and try again.")
    expect(page.get_by_test_id('notice')).to_have_text("Can't reach the shop. Retrying…")

    page.context.set_offline(False)
    expect(page.get_by_test_id('notice')).to_be_hidden()
    page.get_by_test_id('buy').click()
    expect(page.get_by_test_id('order')).to_be_visible()


def test_the_page_fits_a_phone_screen(open_page, admin_email, make_sale):
    make_sale(stock=50, name='Phone case, limited edition colourway')
    page = open_page(viewport={'width': 375, 'height': 740}, is_mobile=True, has_touch=True)
    log_in(page, admin_email)
    expect(page.get_by_test_id('sale-row')).to_have_count(1)
    expect(page.get_by_test_id('buy')).to_be_enabled()
    assert page.evaluate('document.documentElement.scrollWidth') <= 375
    # The sales table stacks instead of scrolling sideways.
    assert page.evaluate("(w => w.scrollWidth <= w.clientWidth)(document.querySelector('.table-wrap'))")
    snap(page, 'phone', full_page=True)


def test_the_page_has_words_for_every_error_code_the_api_sends():
    # No browser needed: app.js's MESSAGES against resources/errors.py's catalogue.
    from resources.errors import CATALOGUE  # noqa: PLC0415

    script = (Path(__file__).resolve().parent.parent / 'resources' / 'static' / 'app.js').read_text()
    block = re.search(r'^const MESSAGES = \{\n(.*?)^\};', script, re.M | re.S)
    assert block, 'no MESSAGES object in app.js'
    known = re.findall(r'^  (\w+):', block.group(1), re.M)
    assert len(known) == len(set(known)), 'a code twice in MESSAGES'
    assert set(CATALOGUE) - set(known) == set(), 'codes the API sends that the page has no words for'
    # The shipped nginx.conf answers some refusals itself, in the API's shape.
    conf = (Path(__file__).resolve().parent.parent / 'scripts' / 'nginx.conf').read_text()
    proxy_codes = set(re.findall(r'"code":"(\w+)"', conf))
    assert {'bad_gateway', 'gateway_timeout', 'rate_limited'} <= proxy_codes
    assert proxy_codes - set(known) == set(), 'codes nginx sends that the page has no words for'
    assert set(known) - set(CATALOGUE) == {'network'} | (proxy_codes - set(CATALOGUE)), \
        'codes in MESSAGES that neither the API nor nginx sends'


def test_the_admin_table_shows_the_newest_page_and_older_ones_on_request(open_page, admin_email, db):
    db.execute("INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock, created_at) "
               "SELECT 'Sale ' || n, now(), now() + interval '1 hour', 1, 1, now() - n * interval '1 second' "
               'FROM generate_series(1, %s) AS n', (sales.PAGE_SIZE + 10,))
    page = open_page()
    log_in(page, admin_email)
    rows = page.get_by_test_id('sale-row')
    expect(rows).to_have_count(sales.PAGE_SIZE)
    expect(rows.first.get_by_test_id('sale-row-name')).to_have_text('Sale 1')
    page.get_by_test_id('sales-more').click()
    expect(rows).to_have_count(sales.PAGE_SIZE + 10)
    expect(rows.last.get_by_test_id('sale-row-name')).to_have_text(f'Sale {sales.PAGE_SIZE + 10}')
    expect(page.get_by_test_id('sales-more')).to_be_hidden()
    # A refresh keeps the pages shown.
    page.get_by_test_id('sales-refresh').click()
    expect(rows).to_have_count(sales.PAGE_SIZE + 10)
