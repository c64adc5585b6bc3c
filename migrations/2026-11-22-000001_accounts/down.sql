DROP TABLE accounts;
DROP TABLE currencies;
