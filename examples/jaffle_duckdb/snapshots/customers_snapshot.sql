{% snapshot customers_snapshot %}

{{
    config(
        unique_key='customer_id',
        strategy='check',
        check_cols=['first_name', 'last_name']
    )
}}

select * from {{ ref('stg_customers') }}

{% endsnapshot %}
