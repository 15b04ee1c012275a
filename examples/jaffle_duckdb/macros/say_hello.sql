{#- Usage: dbt run-operation say_hello --args '{"name": "world"}' -#}
{% macro say_hello(name='world') %}
    {{ log('hello ' ~ name, info=True) }}
{% endmacro %}
