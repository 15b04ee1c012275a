-- Disabled unless run with: --vars '{"fail_on_purpose": true}'
-- When enabled it fails at run time: the table it reads does not exist.
{{ config(enabled=var('fail_on_purpose', false), materialized='table') }}

select * from table_that_does_not_exist
