import pytest

from conftest import auth
from conftest import sale_state


def buy(client, sale_id, token, status, **kwargs):
    return client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=status, **kwargs)


def assert_refused(client, db, sale_id, token, status, code, state):
    """The purchase is answered `status` with `code`, and the sale then
    stands at `state` (total, remaining, orders)."""
    assert buy(client, sale_id, token, status).json['code'] == code
    assert sale_state(db, sale_id) == state


def test_purchase_creates_the_order_and_takes_one_unit(client, make_user, make_sale, db):
    user_id, token = make_user()
    sale_id = make_sale(stock=3)
    order = buy(client, sale_id, token, 201).json['order']
    assert order['userId'] == str(user_id)
    assert order['flashSaleId'] == str(sale_id)
    row = db.execute('SELECT user_id, flash_sale_id FROM orders WHERE id = %s', (order['id'],)).fetchone()
    assert (row['user_id'], row['flash_sale_id']) == (user_id, sale_id)
    assert sale_state(db, sale_id) == (3, 2, 1)


def test_purchase_ignores_a_body(client, make_user, make_sale, db):
    _, token = make_user()
    sale_id = make_sale()
    client.post_json(f'/api/flash-sales/{sale_id}/purchase', {'productId': 'abc'}, headers=auth(token), status=201)
    assert sale_state(db, sale_id) == (10, 9, 1)


def test_purchase_needs_a_token(client, make_sale, db):
    sale_id = make_sale()
    resp = client.post(f'/api/flash-sales/{sale_id}/purchase', status=401)
    assert resp.json['code'] == 'unauthorized'
    assert sale_state(db, sale_id) == (10, 10, 0)


@pytest.mark.parametrize('sale_id', ['nope', '00000000-0000-0000-0000-000000000000'])
def test_purchase_of_unknown_or_malformed_sale_is_404(client, make_user, sale_id):
    _, token = make_user()
    assert buy(client, sale_id, token, 404).json['code'] == 'sale_not_found'


@pytest.mark.parametrize(
    ('starts_in', 'ends_in', 'code'),
    [(30, 90, 'sale_not_started'), (-90, -30, 'sale_ended')],
)
def test_purchase_outside_the_window_is_refused_with_stock_left(client, make_user, make_sale, db, starts_in, ends_in, code):
    _, token = make_user()
    sale_id = make_sale(stock=5, starts_in=starts_in, ends_in=ends_in)
    assert_refused(client, db, sale_id, token, 409, code, (5, 5, 0))


def test_purchase_at_the_exact_end_is_refused(client, make_user, make_sale, db):
    """The window is [start, end): at end_date = now() the sale has ended."""
    _, token = make_user()
    sale_id = make_sale(stock=5)
    # Move end_date to "now" as the purchase statement will see it: a sale that
    # ends before the purchase's transaction starts.
    db.execute('UPDATE flash_sales SET end_date = now() WHERE id = %s', (sale_id,))
    assert_refused(client, db, sale_id, token, 409, 'sale_ended', (5, 5, 0))


def test_sold_out_is_409(client, make_user, make_sale, db):
    _, token = make_user()
    sale_id = make_sale(stock=2, remaining=0)
    db.execute(
        "INSERT INTO users (email, password_hash) VALUES ('a@x.io', 'x'), ('b@x.io', 'x')"
    )
    db.execute(
        "INSERT INTO orders (flash_sale_id, user_id) SELECT %s, id FROM users WHERE email IN ('a@x.io', 'b@x.io')",
        (sale_id,),
    )
    assert_refused(client, db, sale_id, token, 409, 'sold_out', (2, 0, 2))


def test_second_purchase_by_the_same_user_is_409_already_purchased(client, make_user, make_sale, db):
    _, token = make_user()
    sale_id = make_sale(stock=5)
    buy(client, sale_id, token, 201)
    assert_refused(client, db, sale_id, token, 409, 'already_purchased', (5, 4, 1))


def test_already_purchased_wins_over_sold_out(client, make_user, make_sale, db):
    _, token = make_user()
    sale_id = make_sale(stock=1)
    buy(client, sale_id, token, 201)
    assert buy(client, sale_id, token, 409).json['code'] == 'already_purchased'


def test_purchase_by_a_deleted_user_is_401_and_takes_nothing(client, make_user, make_sale, db):
    user_id, token = make_user()
    sale_id = make_sale(stock=5)
    db.execute('DELETE FROM users WHERE id = %s', (user_id,))
    assert_refused(client, db, sale_id, token, 401, 'invalid_token', (5, 5, 0))


def test_my_order_for_a_sale(client, make_user, make_sale):
    _, token = make_user()
    sale_id = make_sale()
    order = buy(client, sale_id, token, 201).json['order']
    resp = client.get(f'/api/me/orders/{sale_id}', headers=auth(token), status=200)
    assert resp.json['order'] == order


def test_my_order_is_404_when_i_have_none(client, make_user, make_sale):
    _, token = make_user()
    sale_id = make_sale()
    assert client.get(f'/api/me/orders/{sale_id}', headers=auth(token), status=404).json['code'] == 'order_not_found'
    assert client.get('/api/me/orders/not-a-uuid', headers=auth(token), status=404).json['code'] == 'order_not_found'


def test_nobody_reads_another_users_order(client, make_user, make_sale):
    _, alice = make_user()
    _, bob = make_user()
    sale_id = make_sale()
    buy(client, sale_id, alice, 201)
    assert client.get(f'/api/me/orders/{sale_id}', headers=auth(bob), status=404).json['code'] == 'order_not_found'
    assert client.get('/api/me/orders', headers=auth(bob), status=200).json == {'orders': []}


def test_my_orders_lists_mine_newest_first(client, make_user, make_sale):
    _, token = make_user()
    first, second = make_sale(name='one'), make_sale(name='two')
    buy(client, first, token, 201)
    buy(client, second, token, 201)
    orders = client.get('/api/me/orders', headers=auth(token), status=200).json['orders']
    assert [o['flashSaleId'] for o in orders] == [str(second), str(first)]


def test_my_orders_need_a_token(client):
    assert client.get('/api/me/orders', status=401).json['code'] == 'unauthorized'
