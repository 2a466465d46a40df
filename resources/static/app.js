// The shopper's page. No framework: the page's state lives in `state`, every
// change goes through a small function, and render() redraws the sale card
// from it (it is cheap, so the countdown simply calls it four times a second).

const TOKEN_KEY = 'flashsale.token';
const POLL_MS = 1500;
const TICK_MS = 250;
// How often an open page looks at its token, and how often the admin's table
// of sales is read again while nothing tells us it changed.
const RENEW_CHECK_MS = 30 * 1000;
const ADMIN_TABLE_MS = 10 * 1000;
// Retries of a login or a purchase the server answered "busy" (503/429).
const BUSY_RETRIES = 20;

const $ = (id) => document.getElementById(id);

const state = {
  user: null,
  sale: null, // the flashSale last read from /api/flash-sales/current
  etag: null,
  // Server clock minus local clock, in ms. Countdowns and the buy button use
  // the server's idea of "now", so a wrong clock on the phone cannot open the
  // button early or late.
  clockOffset: 0,
  order: null, // this user's order in state.sale, if any
  buying: false,
  busyUntil: 0, // local ms: the server asked us to wait until then
  retryingIn: 0, // seconds until an automatic retry of a busy purchase, shown on the button
  salesPages: 1, // pages of the admin's table shown (the API answers the list a page at a time)
};

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, code, message, field, retryAfter) {
    super(message || code);
    this.status = status;
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

function retryAfterSeconds(response) {
  const value = response.headers.get('Retry-After');
  if (!value) return 1;
  const seconds = /^\d+$/.test(value.trim()) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Math.max(1, Math.ceil(seconds) || 1);
}

// Resolves to {status, etag, data}; rejects with an ApiError for every
// refusal, including a network failure (status 0, code "network").
async function api(method, path, { body, etag, auth = true } = {}) {
  const headers = { Accept: 'application/json' };
  const token = auth ? localStorage.getItem(TOKEN_KEY) : null;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (etag) headers['If-None-Match'] = etag;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    // NOTE: with If-None-Match set by us, fetch bypasses the HTTP cache and
    // hands the 304 to this code instead of replaying a cached 200.
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch {
    throw new ApiError(0, 'network', 'network error');
  }
  if (response.status === 304) return { status: 304, etag, data: null };
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.code ?? `http_${response.status}`,
      data?.message ?? '', data?.field, retryAfterSeconds(response));
  }
  return { status: response.status, etag: response.headers.get('ETag'), data };
}

const SESSION_CODES = new Set(['unauthorized', 'invalid_token', 'token_expired', 'session_revoked']);
const SESSION_EXPIRED = 'Your session expired, please log in again.';

function isSessionError(error) {
  return error.status === 401 && SESSION_CODES.has(error.code);
}

function isBusy(error) {
  return error.status === 503 || error.status === 429;
}

const busy = (error) => `The shop is busy, try again in ${error.retryAfter} s.`;
// The API's own message is written for people (it names the field or the
// limit at fault); the status is the last resort.
const apiMessage = (error) => (error.message && error.message !== error.code
  ? error.message : `Something went wrong (error ${error.status}). Please try again.`);

// What the page says for each code the API can send: every code of the
// catalogue in resources/errors.py is here (tests/test_page.py checks), and
// "network" is the page's own. A function gets the error.
const MESSAGES = {
  network: "Can't reach the shop. Check your connection and try again.",
  sold_out: 'Sorry, this sale is sold out.',
  already_purchased: 'You already bought one in this sale.',
  sale_not_started: "The sale hasn't started yet. Try again when the countdown ends.",
  sale_ended: 'Sorry, this sale has ended.',
  sale_not_found: 'This sale no longer exists.',
  no_sale: apiMessage,
  order_not_found: apiMessage,
  invalid_email: 'Enter a valid email address, like name@example.com.',
  invalid_password: 'Your password must be 8 to 72 characters long.',
  email_taken: 'An account with this email already exists. Log in instead.',
  invalid_credentials: "That email and password don't match. Please try again.",
  forbidden: 'Only admins can do that.',
  payload_too_large: 'That is too much text.',
  invalid_json: apiMessage,
  invalid_body: apiMessage,
  missing_field: apiMessage,
  unknown_field: apiMessage,
  invalid_field: apiMessage,
  invalid_parameter: apiMessage,
  unauthorized: SESSION_EXPIRED,
  invalid_token: SESSION_EXPIRED,
  token_expired: SESSION_EXPIRED,
  session_revoked: SESSION_EXPIRED,
  rate_limited: (error) => `Too many attempts. Try again in ${error.retryAfter} s.`,
  overloaded: busy,
  database_unavailable: busy,
  outcome_unknown: busy,
  bad_request: apiMessage,
  headers_too_large: apiMessage,
  not_implemented: apiMessage,
  not_found: apiMessage,
  method_not_allowed: apiMessage,
  range_not_satisfiable: apiMessage,
  unsupported_media_type: apiMessage,
  internal_error: apiMessage,
  // From the shipped nginx.conf, not the app: the app behind it did not answer.
  bad_gateway: "The shop didn't answer. If you were buying, reload to see whether it went through.",
  gateway_timeout: "The shop took too long to answer. If you were buying, reload to see whether it went through.",
};

// ---------------------------------------------------------------- busy: wait and try again

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// The wait the server asked for, plus up to a second (or a quarter of the
// wait) at random, so that a crowd told "2 s" does not come back in step.
function retryDelayMs(error) {
  const wait = error.retryAfter * 1000;
  return wait + Math.random() * Math.min(1000, wait / 4);
}

// request() until it is answered with anything but "busy" (503 or 429 with
// Retry-After), at most BUSY_RETRIES more times, waiting as the server said.
// tell(seconds) is called every second of a wait, and tell(0) when it ends;
// stillWanted() false stops the retries (the shopper moved on).
async function retryWhileBusy(request, tell, stillWanted = () => true) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await request();
    } catch (error) {
      if (!isBusy(error) || attempt >= BUSY_RETRIES || !stillWanted()) throw error;
      const until = Date.now() + retryDelayMs(error);
      while (Date.now() < until && stillWanted()) {
        tell(Math.ceil((until - Date.now()) / 1000));
        await sleep(Math.min(1000, until - Date.now()));
      }
      tell(0);
      if (!stillWanted()) throw error;
    }
  }
}

const busyText = (seconds) => `Busy, trying again in ${seconds} s…`;

function messageFor(error) {
  // Not the API's (a proxy's own 502 or 503, say): by its status.
  const known = Object.hasOwn(MESSAGES, error.code);
  const say = known ? MESSAGES[error.code] : (isBusy(error) ? busy : apiMessage);
  return typeof say === 'function' ? say(error) : say;
}

// ---------------------------------------------------------------- time

// The API sends microseconds; Date.parse is only specified for milliseconds.
function parseTime(iso) {
  return Date.parse(iso.replace(/(\.\d{3})\d+/, '$1'));
}

function serverNow() {
  return Date.now() + state.clockOffset;
}

const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

function showTime(element, iso) {
  element.dateTime = iso;
  setText(element, dateTimeFormat.format(parseTime(iso)));
}

function formatDuration(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const days = Math.floor(total / 86400);
  const clock = [Math.floor(total / 3600) % 24, Math.floor(total / 60) % 60, total % 60]
    .map((n) => String(n).padStart(2, '0')).join(':');
  return days ? `${days}d ${clock}` : clock;
}

// "2026-11-24T14:05:00" in the browser's time zone, as <input type=datetime-local> wants it.
function toLocalInput(date) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`
    + `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

// ---------------------------------------------------------------- small DOM helpers

// Only touches the DOM when the text changes, so live regions do not repeat themselves.
function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function showMessage(element, text, kind = 'error') {
  element.classList.toggle('error', kind === 'error');
  element.classList.toggle('success', kind === 'success');
  setText(element, text);
}

function setFieldError(inputId, text) {
  const input = $(inputId);
  setText($(`${inputId}-error`), text);
  if (text) input.setAttribute('aria-invalid', 'true');
  else input.removeAttribute('aria-invalid');
}

function clearFieldErrors(form) {
  for (const input of form.querySelectorAll('input')) setFieldError(input.id, '');
}

function focusFirstInvalid(form) {
  form.querySelector('[aria-invalid="true"]')?.focus();
}

// ---------------------------------------------------------------- the sale

function phaseOf(sale) {
  const now = serverNow();
  if (now < parseTime(sale.startDate)) return 'upcoming';
  if (now < parseTime(sale.endDate)) return 'active';
  return 'ended';
}

// Why the buy button is disabled, or null when it is not.
function buyBlocker(sale, phase) {
  if (state.order) return 'One per customer.';
  if (phase === 'ended') return 'Check back for the next sale.';
  if (phase === 'active' && sale.remainingStock <= 0) return 'Sold out. Better luck next time!';
  if (!state.user) return 'Log in or create an account to buy.';
  if (phase === 'upcoming') return 'The button unlocks when the sale starts.';
  if (state.buying && state.retryingIn) return busyText(state.retryingIn);
  if (state.buying) return 'Placing your order…';
  const wait = Math.ceil((state.busyUntil - Date.now()) / 1000);
  if (wait > 0) return `The shop is busy, try again in ${wait} s.`;
  return null;
}

const BADGES = {
  upcoming: 'Upcoming',
  active: 'Live now',
  soldOut: 'Sold out',
  ended: 'Ended',
};

function render() {
  const sale = state.sale;
  $('sale-details').hidden = !sale;
  if (!sale) return;

  const phase = phaseOf(sale);
  const soldOut = sale.remainingStock <= 0;
  const badge = phase === 'active' && soldOut ? 'soldOut' : phase;
  const status = $('sale-status');
  setText(status, BADGES[badge]);
  status.className = `badge badge-${badge}`;
  status.dataset.status = badge;

  if (phase === 'upcoming') {
    setText($('countdown-label'), 'Starts in');
    setText($('countdown'), formatDuration(parseTime(sale.startDate) - serverNow()));
  } else if (phase === 'active') {
    setText($('countdown-label'), 'Ends in');
    setText($('countdown'), formatDuration(parseTime(sale.endDate) - serverNow()));
  } else {
    setText($('countdown-label'), 'This sale has ended.');
    setText($('countdown'), '');
  }

  setText($('stock-remaining'), String(sale.remainingStock));
  setText($('stock-total'), String(sale.totalStock));
  $('stock-bar').max = sale.totalStock;
  $('stock-bar').value = sale.remainingStock;

  const blocker = buyBlocker(sale, phase);
  const buy = $('buy');
  buy.disabled = blocker !== null;
  const label = state.order ? 'Bought'
    : state.buying ? 'Buying…'
      : phase === 'ended' ? 'Sale ended'
        : phase === 'active' && soldOut ? 'Sold out'
          : 'Buy now';
  setText(buy, label);
  setText($('buy-hint'), blocker ?? 'One per customer. Good luck!');

  $('order').hidden = !state.order;
  if (state.order) {
    setText($('order-id'), state.order.id);
    showTime($('order-time'), state.order.createdAt);
  }
}

function setSale(sale) {
  const changed = sale?.id !== state.sale?.id;
  state.sale = sale;
  $('sale-loading').hidden = true;
  $('sale').setAttribute('aria-busy', 'false');
  $('no-sale').hidden = Boolean(sale);
  if (sale) {
    setText($('sale-name'), sale.name);
    showTime($('sale-start'), sale.startDate);
    showTime($('sale-end'), sale.endDate);
  }
  if (changed) {
    state.order = null;
    setText($('buy-message'), '');
    checkOrder();
  }
  render();
}

async function refreshSale() {
  let result;
  try {
    result = await api('GET', '/api/flash-sales/current', { etag: state.etag, auth: false });
  } catch (error) {
    if (error.code === 'no_sale') {
      state.etag = null;
      setSale(null);
      showNotice('');
    } else if (error.code === 'network') {
      showNotice("Can't reach the shop. Retrying…");
    } else {
      showNotice(`${messageFor(error)} Retrying…`);
    }
    return;
  }
  showNotice('');
  if (result.status === 304) return;
  state.clockOffset = parseTime(result.data.serverTime) - Date.now();
  state.etag = result.etag;
  setSale(result.data.flashSale);
  // The current sale changed (stock, or which sale): so did the admin's table.
  if (state.user?.isAdmin) loadSales();
}

// Poll while the tab is visible; a hidden tab costs the server nothing.
let pollTimer = 0;
let polling = false;

async function poll() {
  clearTimeout(pollTimer);
  if (polling || document.hidden) return;
  polling = true;
  try {
    await refreshSale();
  } finally {
    polling = false;
    if (!document.hidden) pollTimer = setTimeout(poll, POLL_MS);
  }
}

function showNotice(text) {
  setText($('notice'), text);
  $('notice').hidden = !text;
}

// ---------------------------------------------------------------- orders

async function checkOrder() {
  const sale = state.sale;
  if (!sale || !state.user) return;
  try {
    const { data } = await api('GET', `/api/me/orders/${sale.id}`);
    if (state.sale?.id === sale.id && state.user) state.order = data.order;
  } catch (error) {
    if (isSessionError(error)) return sessionExpired();
    // order_not_found is the everyday answer: no order yet. Anything else we
    // learn again on the next sale change or reload; the buy button still works.
  }
  render();
}

async function buy() {
  const sale = state.sale;
  if (!sale || state.buying || state.order) return;
  state.buying = true;
  setText($('buy-message'), '');
  render();
  try {
    // Retrying a purchase is safe: it is one order per person, so a retry of
    // one that did go through is answered already_purchased, never a second
    // order (and a busy answer means nothing was bought).
    const { data } = await retryWhileBusy(
      () => api('POST', `/api/flash-sales/${sale.id}/purchase`, { body: {} }),
      (seconds) => {
        state.retryingIn = seconds;
        showMessage($('buy-message'), seconds ? busyText(seconds) : 'Trying again…', 'info');
        render();
      },
      () => state.sale?.id === sale.id && state.user !== null,
    );
    state.order = data.order;
    setText($('buy-message'), '');
    poll(); // show the new stock now, not in 1.5 s
    if (state.user?.isAdmin) loadSales(); // and the admin's count of items sold
  } catch (error) {
    if (isSessionError(error)) return sessionExpired();
    if (error.code === 'already_purchased') await checkOrder();
    if (error.code === 'sold_out') sale.remainingStock = 0;
    if (isBusy(error)) state.busyUntil = Date.now() + error.retryAfter * 1000;
    showMessage($('buy-message'), messageFor(error));
  } finally {
    state.buying = false;
    state.retryingIn = 0;
    render();
  }
}

// ---------------------------------------------------------------- accounts

function signedIn(user) {
  state.user = user;
  $('account').hidden = false;
  setText($('account-email'), user.email);
  $('auth').hidden = true;
  setText($('auth-message'), '');
  $('admin').hidden = !user.isAdmin;
  if (user.isAdmin) {
    prefillCreateForm();
    loadSales();
  }
  checkOrder();
  renewSession();
  render();
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  state.user = null;
  state.order = null;
  $('account').hidden = true;
  $('admin').hidden = true;
  $('auth').hidden = false;
  setText($('buy-message'), '');
  showAuthForm('login');
  render();
}

// ---------------------------------------------------------------- keeping the session

// The token's own claims (it is ours: no need to verify it here, the server does).
function tokenClaims(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload));
  } catch {
    return null;
  }
}

// A shopper who logs in an hour before the sale must still be logged in when
// it opens: past half its life, the token is swapped for a fresh one (no
// password, no bcrypt: POST /api/auth/refresh). A busy or unreachable server
// is asked again at the next check; a refused token means log in again.
let renewing = false;

async function renewSession() {
  const token = localStorage.getItem(TOKEN_KEY);
  const claims = token && tokenClaims(token);
  if (!state.user || renewing || !claims?.exp || !claims?.iat) return;
  const halfLife = ((claims.exp - claims.iat) * 1000) / 2;
  if (claims.exp * 1000 - Date.now() > halfLife) return;
  renewing = true;
  try {
    const { data } = await api('POST', '/api/auth/refresh');
    // Only if nobody logged in or out meanwhile (here or in another tab).
    if (localStorage.getItem(TOKEN_KEY) === token) localStorage.setItem(TOKEN_KEY, data.token);
  } catch (error) {
    if (error.status === 401 && localStorage.getItem(TOKEN_KEY) === token) sessionExpired();
  } finally {
    renewing = false;
  }
}

function sessionExpired() {
  signOut();
  showMessage($('auth-message'), SESSION_EXPIRED);
  $('login-email').focus();
}

async function loadUser() {
  if (!localStorage.getItem(TOKEN_KEY)) return signOut();
  try {
    const { data } = await api('GET', '/api/me');
    signedIn(data.user);
  } catch (error) {
    if (error.status === 401) {
      signOut();
      if (error.code === 'token_expired') showMessage($('auth-message'), SESSION_EXPIRED);
    } else {
      // The token may be fine; the server is not. Keep it and ask again.
      showNotice(`${messageFor(error)} Retrying…`);
      setTimeout(loadUser, 3000);
    }
  }
}

function showAuthForm(kind) {
  $('login-form').hidden = kind !== 'login';
  $('register-form').hidden = kind !== 'register';
  setText($('auth-title'), kind === 'login' ? 'Log in to buy' : 'Create an account');
  setText($('auth-message'), '');
}

// Which input an API refusal is about, if any.
function authField(error) {
  if (error.field === 'email' || error.field === 'password') return error.field;
  if (error.code === 'invalid_email' || error.code === 'email_taken') return 'email';
  if (error.code === 'invalid_password') return 'password';
  return null;
}

async function submitAuth(kind, event) {
  event.preventDefault();
  const form = $(`${kind}-form`);
  const submit = $(`${kind}-submit`);
  clearFieldErrors(form);
  setText($('auth-message'), '');
  const email = $(`${kind}-email`).value.trim();
  const password = $(`${kind}-password`).value;
  if (!email) setFieldError(`${kind}-email`, 'Enter your email address.');
  if (!password) setFieldError(`${kind}-password`, 'Enter your password.');
  if (!email || !password) return focusFirstInvalid(form);

  submit.disabled = true;
  try {
    // A busy answer (the queue for password checks is full) did nothing:
    // trying again is safe for a registration too.
    const { data } = await retryWhileBusy(
      () => api('POST', `/api/auth/${kind}`, { body: { email, password }, auth: false }),
      (seconds) => showMessage($('auth-message'), seconds ? busyText(seconds) : 'Trying again…', 'info'),
    );
    setText($('auth-message'), '');
    localStorage.setItem(TOKEN_KEY, data.token);
    form.reset();
    signedIn(data.user);
    // The form just vanished with the focus in it: move on to what the
    // shopper came for.
    ($('buy').disabled ? $('sale') : $('buy')).focus();
  } catch (error) {
    const field = authField(error);
    if (field) {
      setFieldError(`${kind}-${field}`, messageFor(error));
      focusFirstInvalid(form);
    } else {
      showMessage($('auth-message'), messageFor(error));
    }
  } finally {
    submit.disabled = false;
  }
}

// ---------------------------------------------------------------- admin

const CREATE_FIELDS = { name: 'create-name', startDate: 'create-start', endDate: 'create-end', totalStock: 'create-stock' };

function prefillCreateForm() {
  if ($('create-start').value) return;
  const start = new Date(Date.now() + 10 * 60 * 1000);
  start.setSeconds(0, 0);
  $('create-start').value = toLocalInput(start);
  $('create-end').value = toLocalInput(new Date(start.getTime() + 60 * 60 * 1000));
  $('create-stock').value = '100';
}

async function createSale(event) {
  event.preventDefault();
  const form = $('create-sale-form');
  clearFieldErrors(form);
  setText($('create-message'), '');
  const name = $('create-name').value.trim();
  const start = $('create-start').value;
  const end = $('create-end').value;
  const stock = $('create-stock').value;
  if (!start) setFieldError('create-start', 'Choose when the sale starts.');
  if (!end) setFieldError('create-end', 'Choose when the sale ends.');
  if (!/^\d+$/.test(stock)) setFieldError('create-stock', 'Enter a whole number of items.');
  if (form.querySelector('[aria-invalid="true"]')) return focusFirstInvalid(form);

  // datetime-local has no zone: new Date() reads it in the browser's zone,
  // and toISOString() writes UTC with a 'Z', which is what the API wants.
  const body = {
    startDate: new Date(start).toISOString(),
    endDate: new Date(end).toISOString(),
    totalStock: Number(stock),
  };
  if (name) body.name = name;

  $('create-submit').disabled = true;
  try {
    const { data } = await api('POST', '/api/flash-sales', { body });
    showMessage($('create-message'), `Created “${data.flashSale.name}”.`, 'success');
    $('create-name').value = '';
    loadSales();
    poll();
  } catch (error) {
    if (isSessionError(error)) return sessionExpired();
    const inputId = CREATE_FIELDS[error.field];
    if (inputId) {
      setFieldError(inputId, messageFor(error));
      focusFirstInvalid(form);
    } else {
      showMessage($('create-message'), messageFor(error));
    }
  } finally {
    $('create-submit').disabled = false;
  }
}

const shortDateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'short' });

// column -> [heading, cell text]. The heading is repeated in each cell's
// data-label for the stacked layout on narrow screens (see style.css).
const SALE_COLUMNS = {
  name: ['Name', (sale) => sale.name],
  start: ['Starts', (sale) => shortDateTime.format(parseTime(sale.startDate))],
  end: ['Ends', (sale) => shortDateTime.format(parseTime(sale.endDate))],
  status: ['Status', (sale) => BADGES[sale.status === 'active' && sale.remainingStock <= 0 ? 'soldOut' : sale.status]],
  sold: ['Sold', (sale) => `${sale.totalStock - sale.remainingStock} / ${sale.totalStock}`],
};

function saleRow(sale) {
  const row = document.createElement('tr');
  row.dataset.testid = 'sale-row';
  row.dataset.saleId = sale.id;
  for (const [column, [heading, text]] of Object.entries(SALE_COLUMNS)) {
    const cell = document.createElement('td');
    cell.textContent = text(sale);
    cell.dataset.label = heading;
    cell.dataset.testid = `sale-row-${column}`;
    row.append(cell);
  }
  return row;
}

// The newest sales, as many pages as the admin has asked for ("Older
// sales" adds one); every refresh reloads those pages, following each
// page's nextCursor.
async function loadSales() {
  try {
    const sales = [];
    let cursor = null;
    for (let page = 0; page < state.salesPages; page += 1) {
      const query = cursor ? `?cursor=${encodeURIComponent(cursor)}` : '';
      const { data } = await api('GET', `/api/flash-sales${query}`);
      sales.push(...data.flashSales);
      cursor = data.nextCursor;
      if (!cursor) break;
    }
    $('sales-rows').replaceChildren(...sales.map(saleRow));
    $('sales-more').hidden = !cursor;
    setText($('sales-message'), sales.length ? '' : 'No sales yet.');
    $('sales-message').classList.remove('error');
  } catch (error) {
    if (isSessionError(error)) return sessionExpired();
    showMessage($('sales-message'), messageFor(error));
  }
}

// ---------------------------------------------------------------- wiring

$('buy').addEventListener('click', buy);
$('login-form').addEventListener('submit', (event) => submitAuth('login', event));
$('register-form').addEventListener('submit', (event) => submitAuth('register', event));
$('show-register').addEventListener('click', () => {
  showAuthForm('register');
  $('register-email').focus();
});
$('show-login').addEventListener('click', () => {
  showAuthForm('login');
  $('login-email').focus();
});
$('logout').addEventListener('click', () => {
  signOut();
  $('login-email').focus();
});
$('create-sale-form').addEventListener('submit', createSale);
$('sales-refresh').addEventListener('click', loadSales);
$('sales-more').addEventListener('click', () => {
  state.salesPages += 1;
  loadSales();
});

document.addEventListener('visibilitychange', poll);
document.addEventListener('visibilitychange', () => { if (!document.hidden) renewSession(); });
setInterval(renewSession, RENEW_CHECK_MS);
// Sales other than the polled one change too (another admin's new sale).
setInterval(() => { if (state.user?.isAdmin && !document.hidden) loadSales(); }, ADMIN_TABLE_MS);
// Logging in or out in another tab changes the token under us.
window.addEventListener('storage', (event) => {
  if (event.key === TOKEN_KEY) loadUser();
});
setInterval(render, TICK_MS);

loadUser();
poll();
